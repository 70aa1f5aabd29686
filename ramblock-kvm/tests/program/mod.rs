//! Running the `ramblock` program from a test: a `ramblock migrate --json`
//! child whose output is collected as it comes and which is killed after
//! [`LIMIT`] or when dropped, and reading its one-line JSON summary. Shared
//! by the tests that drive the program end to end.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest any one `ramblock` process may run.
pub const LIMIT: Duration = Duration::from_secs(60);

/// A `ramblock migrate --json` child whose output is collected as it
/// comes (so a full pipe never stalls it) and which is killed if dropped
/// while still running.
pub struct Running {
    what: String,
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    let mut pipe = pipe?;
    Some(std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    }))
}

impl Running {
    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn start(args: &[&str]) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ramblock"))
            .arg("migrate")
            .arg("--json")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ramblock");
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        Running {
            what: format!("ramblock migrate --json {}", args.join(" ")),
            child,
            stdout,
            stderr,
        }
    }

    pub fn collected(&mut self) -> (Vec<u8>, Vec<u8>) {
        let join = |h: Option<JoinHandle<Vec<u8>>>| h.map_or(Vec::new(), |h| h.join().unwrap());
        (join(self.stdout.take()), join(self.stderr.take()))
    }

    /// Waits for the exit; kills the child and fails after [`LIMIT`].
    pub fn finish(mut self) -> Output {
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for ramblock") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let (out, err) = self.collected();
                panic!(
                    "`{}` still running after {LIMIT:?}; killed it\nstdout: {}\nstderr: {}",
                    self.what,
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let (stdout, stderr) = self.collected();
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `ramblock migrate --json ARGS` to the end, within [`LIMIT`].
pub fn run(args: &[&str]) -> Output {
    Running::start(args).finish()
}

/// The summary line, and stderr for failure messages.
pub fn texts(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The raw value of `key` in the one-line JSON summary (numbers, booleans
/// and null as written; strings keep their quotes).
pub fn field<'j>(json: &'j str, key: &str) -> &'j str {
    let label = format!("\"{key}\":");
    let at = json
        .find(&label)
        .unwrap_or_else(|| panic!("no {key} in {json}"));
    let rest = &json[at + label.len()..];
    let end = if let Some(inside) = rest.strip_prefix('"') {
        // Up to the closing quote, stepping over escaped characters.
        let mut escaped = false;
        1 + inside
            .char_indices()
            .find(|&(_, c)| {
                let close = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                close
            })
            .map_or(rest.len() - 1, |(i, _)| i + 1)
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    &rest[..end]
}

/// A free loopback port (bound, then released for a child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
