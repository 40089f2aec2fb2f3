//! A fixed pool of named worker threads serving a bounded queue of jobs, plus an unbounded
//! lane of tasks (answers to woken or committed requests) that workers take first.
//!
//! Shutdown runs in two steps: once the job senders are gone each worker reports that it
//! took its last job, and keeps running tasks until it receives a `None` task.
//!
//! The task lane is unbounded in type but bounded in practice: every task answers requests
//! that were already admitted through a bounded queue or the capped registry. A panicking
//! job or task is caught; whatever request it held answers 500 as it unwinds, and the worker
//! lives on, so the pool never shrinks.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender, select_biased};

/// Work for a worker outside any request; `None` tells one worker to stop.
pub type Task = Option<Box<dyn FnOnce() + Send>>;

/// Stack for workers: handlers are shallow, SQLite needs well under this.
const WORKER_STACK: usize = 1 << 20;

/// The worker threads; dropping every sender of both channels stops them.
pub struct Pool {
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` workers. Each builds its context with `init` (for example its own database
    /// connection), then runs jobs with `handle` and tasks as they come.
    pub fn start<C, J>(
        n: usize,
        jobs: Receiver<J>,
        tasks: Receiver<Task>,
        jobs_done: Sender<()>,
        init: impl Fn(usize) -> C + Send + Sync + Clone + 'static,
        handle: impl Fn(&mut C, J) + Send + Sync + Clone + 'static,
    ) -> std::io::Result<Pool>
    where
        J: Send + 'static,
    {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let (jobs, tasks, init, handle) =
                (jobs.clone(), tasks.clone(), init.clone(), handle.clone());
            let jobs_done = jobs_done.clone();
            let spawned = thread::Builder::new()
                .name(format!("worker-{i}"))
                .stack_size(WORKER_STACK)
                .spawn(move || {
                    let mut ctx = init(i);
                    run(&mut ctx, &jobs, &tasks, &jobs_done, &handle);
                })?;
            handles.push(spawned);
        }
        Ok(Pool { handles })
    }

    /// Waits for every worker to finish (after the senders are dropped).
    pub fn join(self) {
        for handle in self.handles {
            let _ = handle.join();
        }
    }
}

fn run<C, J>(
    ctx: &mut C,
    jobs: &Receiver<J>,
    tasks: &Receiver<Task>,
    jobs_done: &Sender<()>,
    handle: &impl Fn(&mut C, J),
) {
    let mut jobs_open = true;
    loop {
        // Tasks answer requests already admitted; serve them before taking new work.
        while let Ok(task) = tasks.try_recv() {
            let Some(task) = task else { return };
            guard(task);
        }
        let task = if jobs_open {
            select_biased! {
                recv(tasks) -> task => task,
                recv(jobs) -> job => {
                    match job {
                        Ok(job) => guard(|| handle(ctx, job)),
                        Err(_) => {
                            jobs_open = false;
                            let _ = jobs_done.send(());
                        }
                    }
                    continue;
                },
            }
        } else {
            tasks.recv()
        };
        match task {
            Ok(Some(task)) => guard(task),
            Ok(None) | Err(_) => return,
        }
    }
}

fn guard(f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        crate::log::error("a request handler panicked; it was answered 500 and the worker goes on");
    }
}
