//! A minimal QMP client: one JSON object per line over a Unix socket.
//!
//! Only what the bench needs: the greeting and capabilities handshake,
//! commands with their answer (events arriving in between are skipped),
//! and reading guest memory through the human monitor's `xp`.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Which QEMU this is ("source", "destination"), for error messages.
    name: &'static str,
}

impl Qmp {
    /// Connects to the socket QEMU creates at `path`, retrying until
    /// `deadline` while QEMU starts, and enters command mode.
    pub fn connect(path: &Path, name: &'static str, deadline: Instant) -> Result<Qmp, String> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "{name} QEMU: no QMP socket at {} ({e})",
                        path.display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        // pmemsave of a large range blocks QEMU's monitor for seconds.
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            name,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!(
                "{name} QEMU: expected a QMP greeting, got {greeting}"
            ));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("{} QEMU: reading QMP failed: {e}", self.name))?;
        if n == 0 {
            return Err(format!(
                "{} QEMU closed its QMP socket (exited?)",
                self.name
            ));
        }
        serde_json::from_str(&line)
            .map_err(|e| format!("{} QEMU: bad QMP line {line:?}: {e}", self.name))
    }

    /// Runs `command` and returns its `return` value; a QMP `error` becomes
    /// an `Err` naming the command and QEMU's description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}")
            .map_err(|e| format!("{} QEMU: sending {command} failed: {e}", self.name))?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                continue;
            }
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            let desc = message
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .unwrap_or("no description");
            return Err(format!("{} QEMU: {command} failed: {desc}", self.name));
        }
    }

    /// The run state from `query-status` ("running", "paused", "inmigrate",
    /// "postmigrate", ...).
    pub fn status(&mut self) -> Result<String, String> {
        let ret = self.execute("query-status", json!({}))?;
        Ok(ret["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// `count` little-endian 64-bit words of guest-physical memory at `gpa`,
    /// read through the human monitor's `xp`.
    pub fn read_words(&mut self, gpa: u64, count: usize) -> Result<Vec<u64>, String> {
        let text = self.execute(
            "human-monitor-command",
            json!({ "command-line": format!("xp /{count}gx {gpa:#x}") }),
        )?;
        let text = text.as_str().unwrap_or_default();
        let words: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .flat_map(|(_, values)| values.split_whitespace())
            .filter_map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .collect();
        if words.len() != count {
            return Err(format!(
                "{} QEMU: `xp` at {gpa:#x} gave {} words, wanted {count}: {text:?}",
                self.name,
                words.len()
            ));
        }
        Ok(words)
    }
}
