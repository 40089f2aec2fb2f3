//! A real headless Chromium (Debian's `chromium`), driven over the DevTools protocol on a
//! pipe: one page, scripts evaluated in it, screenshots, and every authentication challenge
//! the browser meets recorded (it would show its login dialog for each) and cancelled, or
//! answered as a person signing in would.
//!
//! Chromium speaks the protocol on file descriptors 3 (commands in) and 4 (answers out)
//! with `--remote-debugging-pipe`, each message JSON ended by a NUL byte. A shell hands it
//! our stdin and stdout pipes as those descriptors, so no unsafe code is needed here.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long one protocol call may take, page loads and script promises included.
const PATIENT: Duration = Duration::from_secs(30);

/// A headless Chromium with one page, intercepting its requests to see authentication
/// challenges.
pub struct Chromium {
    child: Child,
    commands: ChildStdin,
    messages: Receiver<Value>,
    next_id: u64,
    /// The page's protocol session.
    session: String,
    /// The URLs whose answers challenged the browser for credentials, in order.
    pub challenges: Vec<String>,
    /// What a person types into the login dialog; `None` dismisses it.
    credentials: Option<(String, String)>,
    dir: tempfile::TempDir,
}

impl Chromium {
    /// Starts Chromium with a blank page; `None`, after saying why on stderr, when it is
    /// not installed and this is not CI (in CI, where `.ci/run` installs it, its absence
    /// fails the test). The test is named by its thread, which the test harness names after
    /// it.
    pub fn start_or_skip() -> Option<Chromium> {
        let installed = Command::new("chromium")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            let current = std::thread::current();
            let test = current.name().unwrap_or("a browser test");
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: chromium is not installed (CI must install it: apt-get install chromium)"
            );
            eprintln!("SKIPPED {test}: chromium is not installed (apt-get install chromium)");
            return None;
        }
        Some(Chromium::start())
    }

    fn start() -> Chromium {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = std::fs::File::create(dir.path().join("chromium.log")).expect("log file");
        let profile = dir.path().join("profile");
        let mut child = Command::new("sh")
            .args(["-c", "exec 3<&0 4>&1 0</dev/null 1>&2; exec \"$@\"", "sh"])
            .args([
                "chromium",
                "--headless",
                "--remote-debugging-pipe",
                "--no-sandbox",
            ])
            .args(["--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
            .args(["--window-size=1280,900", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            // Its singleton socket and other temporary files go with the test's directory,
            // not into /tmp for good once it is killed.
            .env("TMPDIR", dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start chromium");
        let commands = child.stdin.take().expect("piped stdin");
        let answers = BufReader::new(child.stdout.take().expect("piped stdout"));
        let (tx, messages) = std::sync::mpsc::channel();
        let reader = std::thread::Builder::new().name("chromium-reader".into());
        let spawned = reader.spawn(move || {
            for message in answers.split(0) {
                let Ok(message) = message else { return };
                let Ok(message) = serde_json::from_slice(&message) else {
                    return;
                };
                if tx.send(message).is_err() {
                    return;
                }
            }
        });
        spawned.expect("spawn the reader of chromium's answers");
        let mut chromium = Chromium {
            child,
            commands,
            messages,
            next_id: 0,
            session: String::new(),
            challenges: Vec::new(),
            credentials: None,
            dir,
        };
        let target = chromium.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target = json!({"targetId": target["targetId"], "flatten": true});
        let attached = chromium.call(None, "Target.attachToTarget", target);
        chromium.session = attached["sessionId"].as_str().expect("a session").into();
        let intercept = json!({"patterns": [{"urlPattern": "*"}], "handleAuthRequests": true});
        chromium.page("Fetch.enable", intercept);
        chromium.page("Page.enable", json!({}));
        chromium
    }

    /// Calls `method` on the page.
    pub fn page(&mut self, method: &str, params: Value) -> Value {
        let session = Some(self.session.clone());
        self.call(session, method, params)
    }

    /// Opens `url` in the page and waits until it has loaded.
    pub fn navigate(&mut self, url: &str) {
        self.page("Page.navigate", json!({ "url": url }));
        self.pump_until(|message| message["method"] == "Page.loadEventFired");
    }

    /// The value `expression` evaluates to in the page, once its promise (if any) settles.
    pub fn evaluate(&mut self, expression: &str) -> Value {
        let params = json!({"expression": expression, "awaitPromise": true, "returnByValue": true});
        let result = self.page("Runtime.evaluate", params);
        assert!(result.get("exceptionDetails").is_none(), "{result}");
        result["result"]["value"].clone()
    }

    /// Answers every later login dialog with these credentials, as a person would.
    pub fn sign_in(&mut self, user: &str, password: &str) {
        self.credentials = Some((user.to_owned(), password.to_owned()));
    }

    /// Waits until `cond` holds, failing the test after `within`. The browser goes on
    /// meanwhile: its requests wait for this harness to let them through.
    pub fn wait_until(
        &mut self,
        within: Duration,
        what: &str,
        mut cond: impl FnMut(&mut Chromium) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            self.pump(Instant::now() + Duration::from_millis(5), |_| false);
        }
    }

    /// Waits until `expression` is true in the page, failing the test after `within`.
    pub fn wait_for(&mut self, within: Duration, expression: &str) {
        self.wait_until(within, expression, |c| c.evaluate(expression) == true);
    }

    /// Writes a PNG of the page as shown to `path`.
    pub fn screenshot(&mut self, path: &std::path::Path) {
        use base64::Engine;
        let shot = self.page("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("the picture"))
            .expect("base64");
        std::fs::write(path, png).expect("write the screenshot");
    }

    /// Sends a command and returns its result, handling the events that come meanwhile.
    fn call(&mut self, session: Option<String>, method: &str, params: Value) -> Value {
        let id = self.send(session, method, params);
        let answer = self.pump_until(|message| message["id"] == id);
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    fn send(&mut self, session: Option<String>, method: &str, params: Value) -> u64 {
        self.next_id += 1;
        let mut message = json!({"id": self.next_id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = session.into();
        }
        let mut bytes = serde_json::to_vec(&message).expect("JSON");
        bytes.push(0);
        self.commands.write_all(&bytes).expect("write to chromium");
        self.next_id
    }

    /// Handles messages until one satisfies `done`, which it returns, failing the test if
    /// none comes in time.
    fn pump_until(&mut self, done: impl Fn(&Value) -> bool) -> Value {
        let answer = self.pump(Instant::now() + PATIENT, done);
        answer.expect("chromium did not answer in time")
    }

    /// Handles messages until one satisfies `done` (returned) or `deadline` passes
    /// (`None`): paused requests go on, and each authentication challenge is recorded and
    /// answered with the credentials given to [`Chromium::sign_in`], or cancelled, as a
    /// user would dismiss the login dialog.
    fn pump(&mut self, deadline: Instant, done: impl Fn(&Value) -> bool) -> Option<Value> {
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let message = match self.messages.recv_timeout(wait) {
                Ok(message) => message,
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "chromium exited; its log:\n{}",
                    std::fs::read_to_string(self.dir.path().join("chromium.log"))
                        .unwrap_or_default()
                ),
            };
            // Answered without waiting: their results are not needed, and waiting here
            // could swallow the answer the caller waits for.
            let request = message["params"]["requestId"].clone();
            let session = Some(self.session.clone());
            match message["method"].as_str() {
                Some("Fetch.requestPaused") => {
                    let go_on = json!({ "requestId": request });
                    self.send(session, "Fetch.continueRequest", go_on);
                }
                Some("Fetch.authRequired") => {
                    let url = message["params"]["request"]["url"].as_str().unwrap_or("?");
                    self.challenges.push(url.to_owned());
                    let response = match &self.credentials {
                        Some((user, password)) => json!({"response": "ProvideCredentials",
                            "username": user, "password": password}),
                        None => json!({"response": "CancelAuth"}),
                    };
                    let answer = json!({"requestId": request, "authChallengeResponse": response});
                    self.send(session, "Fetch.continueWithAuth", answer);
                }
                _ => {}
            }
            if done(&message) {
                return Some(message);
            }
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
