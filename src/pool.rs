//! A fixed pool of named worker threads serving two bounded queues of jobs, the first before
//! the second, plus an unbounded lane of tasks (answers to woken or committed requests) that
//! workers take before any job.
//!
//! Shutdown runs in two steps: once the job senders are gone each worker reports that it
//! took its last job, and keeps running tasks until it receives [`Task::Stop`].
//!
//! The task lane is unbounded in type but bounded in practice: every task answers requests
//! that were already admitted through a bounded queue or the capped registry. A panicking
//! job or task is caught; whatever request it held answers 500 as it unwinds, and the worker
//! lives on, so the pool never shrinks.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender, select_biased};

/// Work for a worker outside any request, taken before any new request.
pub enum Task {
    /// Send answers the runtime prepared: to requests whose writes committed, or to parked
    /// long-polls that were woken or expired.
    Answer(Box<dyn FnOnce() + Send>),
    /// Stop the worker that takes it (one per worker, at shutdown, after the last request).
    Stop,
}

/// Stack for workers: handlers are shallow, SQLite needs well under this.
const WORKER_STACK: usize = 1 << 20;

/// The worker threads; dropping every sender of both channels stops them.
pub struct Pool {
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` workers. Each builds its context with `init` (for example its own database
    /// connection), then runs jobs with `handle` and tasks as they come. Jobs in `jobs[0]`
    /// are taken before those in `jobs[1]`; both senders are to be dropped together.
    pub fn start<C, J>(
        n: usize,
        jobs: [Receiver<J>; 2],
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

    /// Waits for every worker to finish (after the senders are dropped); returns the first
    /// panic that ended one (a panic outside any job or task, which `guard` does not catch).
    pub fn join(self) -> Option<Box<dyn std::any::Any + Send>> {
        let mut first = None;
        for handle in self.handles {
            if let Err(panic) = handle.join() {
                first.get_or_insert(panic);
            }
        }
        first
    }
}

fn run<C, J>(
    ctx: &mut C,
    jobs: &[Receiver<J>; 2],
    tasks: &Receiver<Task>,
    jobs_done: &Sender<()>,
    handle: &impl Fn(&mut C, J),
) {
    let mut jobs_open = true;
    loop {
        // Tasks answer requests already admitted; serve them before taking new work.
        while let Ok(task) = tasks.try_recv() {
            let Task::Answer(answer) = task else { return };
            guard(answer);
        }
        let task = if jobs_open {
            let job = select_biased! {
                recv(tasks) -> task => Err(task),
                recv(jobs[0]) -> job => Ok(job),
                recv(jobs[1]) -> job => Ok(job),
            };
            match job {
                Err(task) => task,
                Ok(Ok(job)) => {
                    guard(|| handle(ctx, job));
                    continue;
                }
                Ok(Err(_)) => {
                    // The senders are gone: serve what is left in either queue, then stop
                    // taking jobs.
                    for lane in jobs {
                        while let Ok(job) = lane.try_recv() {
                            guard(|| handle(ctx, job));
                        }
                    }
                    jobs_open = false;
                    let _ = jobs_done.send(());
                    continue;
                }
            }
        } else {
            tasks.recv()
        };
        match task {
            Ok(Task::Answer(answer)) => guard(answer),
            Ok(Task::Stop) | Err(_) => return,
        }
    }
}

fn guard(f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        crate::log::error("a request handler panicked; it was answered 500 and the worker goes on");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use crossbeam_channel::{bounded, unbounded};

    use super::*;

    /// A worker takes every queued job of the first queue before any of the second, and
    /// serves what is left in both once the senders are dropped.
    #[test]
    fn the_first_queue_goes_first() {
        let (first_tx, first_rx) = bounded(8);
        let (second_tx, second_rx) = bounded(8);
        let (tasks_tx, tasks_rx) = unbounded::<Task>();
        let (done_tx, done_rx) = unbounded();
        let (start_tx, start_rx) = bounded::<()>(0);
        for n in 0..4 {
            second_tx.send(10 + n).unwrap();
            first_tx.send(n).unwrap();
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let pool = Pool::start(
            1,
            [first_rx, second_rx],
            tasks_rx,
            done_tx,
            // The worker starts only once every job is queued.
            move |_| start_rx.recv().unwrap_or(()),
            move |_: &mut (), job: u32| log.lock().unwrap().push(job),
        )
        .unwrap();
        start_tx.send(()).unwrap();
        drop((first_tx, second_tx));
        done_rx.recv().unwrap();
        tasks_tx.send(Task::Stop).unwrap();
        assert!(pool.join().is_none(), "no worker panicked");
        assert_eq!(*seen.lock().unwrap(), [0, 1, 2, 3, 10, 11, 12, 13]);
    }
}
