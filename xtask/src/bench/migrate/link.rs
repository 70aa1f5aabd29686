//! The path between source and destination: loopback, or two network
//! namespaces joined by a veth pair shaped with `tc tbf` (this kernel has
//! no `netem` or `fq`), and the raw TCP ceiling of that path.
//!
//! The namespaces, the pair and their addresses exist only while a
//! [`Link`] lives: dropping it deletes both namespaces, which deletes the
//! veth pair with them. Nothing is configured in the root namespace.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// How the two sides are connected.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Loopback TCP in this namespace (about 3 GB/s here).
    Loopback,
    /// A veth pair shaped to this many megabits per second.
    Shaped { mbit: u64 },
}

impl Shape {
    /// The name `--link` takes and tables show.
    pub fn name(self) -> String {
        match self {
            Shape::Loopback => "loopback".into(),
            Shape::Shaped { mbit } if mbit % 1000 == 0 => format!("{}gbit", mbit / 1000),
            Shape::Shaped { mbit } => format!("{mbit}mbit"),
        }
    }

    /// Parses `loopback`, `10gbit`, `1gbit` or `500mbit`.
    pub fn parse(s: &str) -> Result<Shape, String> {
        let number = |n: &str| n.parse::<u64>().ok().filter(|&n| n > 0);
        let shape = if s == "loopback" {
            Some(Shape::Loopback)
        } else if let Some(g) = s.strip_suffix("gbit") {
            number(g).map(|g| Shape::Shaped { mbit: g * 1000 })
        } else if let Some(m) = s.strip_suffix("mbit") {
            number(m).map(|mbit| Shape::Shaped { mbit })
        } else {
            None
        };
        shape.ok_or_else(|| format!("link {s:?}: use loopback, 10gbit, 1gbit or 500mbit"))
    }
}

/// Where each side runs and the address the destination listens on.
#[derive(Debug)]
pub struct Link {
    shape: Shape,
    /// The source's and destination's namespaces (none on loopback).
    namespaces: Option<[String; 2]>,
}

/// The destination's address inside its namespace.
const DEST_ADDR: &str = "10.213.7.2";
/// The source's address inside its namespace.
const SOURCE_ADDR: &str = "10.213.7.1";

impl Link {
    /// Sets up the path: nothing for loopback; two namespaces, a veth pair
    /// with addresses only inside them, and `tbf` on both ends otherwise.
    pub fn create(shape: Shape) -> Result<Link, String> {
        let Shape::Shaped { mbit } = shape else {
            return Ok(Link {
                shape,
                namespaces: None,
            });
        };
        let pid = std::process::id();
        let names = [format!("rbbench-src-{pid}"), format!("rbbench-dst-{pid}")];
        // From here on, a failure deletes what was made.
        let link = Link {
            shape,
            namespaces: Some(names.clone()),
        };
        let [src, dst] = &names;
        let (veth_src, veth_dst) = (format!("rbs{pid}"), format!("rbd{pid}"));
        ip(&["netns", "add", src])?;
        ip(&["netns", "add", dst])?;
        ip(&[
            "link", "add", &veth_src, "netns", src, "type", "veth", "peer", "name", &veth_dst,
            "netns", dst,
        ])?;
        for (ns, dev, addr) in [(src, &veth_src, SOURCE_ADDR), (dst, &veth_dst, DEST_ADDR)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            // A token bucket at the rate; its burst must hold at least one
            // timer tick's worth of bytes (HZ 250-1000) or the rate is not
            // reached; the queue holds 50 ms before it drops.
            let burst = (mbit * 1_000_000 / 8 / 250).max(64 << 10);
            run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                &burst.to_string(),
                "latency",
                "50ms",
            ]))?;
        }
        Ok(link)
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The address the destination listens on.
    pub fn dest_addr(&self) -> &'static str {
        match self.namespaces {
            Some(_) => DEST_ADDR,
            None => "127.0.0.1",
        }
    }

    /// A command running `program` on the source's side.
    pub fn source_command(&self, program: impl AsRef<Path>) -> Command {
        self.command(0, program.as_ref())
    }

    /// A command running `program` on the destination's side.
    pub fn dest_command(&self, program: impl AsRef<Path>) -> Command {
        self.command(1, program.as_ref())
    }

    fn command(&self, side: usize, program: &Path) -> Command {
        match &self.namespaces {
            // `ip netns exec` enters the namespace and execs the program, so
            // the child's pid is the program's and killing it kills it.
            Some(names) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &names[side]]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// The raw TCP ceiling of this path over `streams` parallel
    /// connections: bytes written as fast as the sockets take them (each
    /// stream its share of `bytes`, from its own thread), in bytes per
    /// second for all streams together. The sending and the receiving end
    /// are this program (`bench tcp-sink` / `tcp-send`) run on each side.
    pub fn tcp_ceiling(&self, bytes: u64, streams: u32) -> Result<f64, String> {
        let me = std::env::current_exe().map_err(|e| format!("cannot find xtask: {e}"))?;
        let port = 40_000 + (std::process::id() % 20_000) as u16;
        let addr = format!("{}:{port}", self.dest_addr());
        let streams = streams.to_string();
        let mut sink = self
            .dest_command(&me)
            .args(["bench", "tcp-sink", &addr, &streams])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the TCP sink: {e}"))?;
        let sent = self
            .source_command(&me)
            .args(["bench", "tcp-send", &addr, &bytes.to_string(), &streams])
            .output()
            .map_err(|e| format!("cannot start the TCP sender: {e}"));
        if !sent.as_ref().is_ok_and(|s| s.status.success()) {
            // A sink that never got its connections would wait forever.
            let _ = sink.kill();
        }
        let received = sink.wait_with_output().map_err(|e| e.to_string())?;
        let sent = sent?;
        if !sent.status.success() || !received.status.success() {
            return Err(format!(
                "raw TCP run failed: sender {} ({}), sink {}",
                sent.status,
                String::from_utf8_lossy(&sent.stderr).trim(),
                received.status
            ));
        }
        let got: u64 = String::from_utf8_lossy(&received.stdout)
            .trim()
            .parse()
            .map_err(|_| "the TCP sink printed no byte count".to_string())?;
        if got != bytes {
            return Err(format!("the TCP sink received {got} of {bytes} bytes"));
        }
        String::from_utf8_lossy(&sent.stdout)
            .trim()
            .parse()
            .map_err(|_| "the TCP sender printed no rate".to_string())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(names) = &self.namespaces {
            for ns in names {
                if let Err(e) = ip(&["netns", "delete", ns]) {
                    eprintln!("xtask: cannot delete network namespace {ns}: {e}");
                }
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `bench tcp-sink ADDR STREAMS`: accepts STREAMS connections, reads each
/// to its end (a thread each) and prints how many bytes came in all.
pub fn tcp_sink(addr: &str, streams: u32) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let readers: Vec<_> = (0..streams)
        .map(|_| {
            let (conn, _) = listener.accept().map_err(|e| e.to_string())?;
            Ok(std::thread::spawn(move || drain(conn)))
        })
        .collect::<Result<_, String>>()?;
    let mut total = 0u64;
    for reader in readers {
        total += reader.join().map_err(|_| "a sink thread panicked")??;
    }
    println!("{total}");
    Ok(())
}

/// Reads `conn` to its end; returns how many bytes came.
fn drain(mut conn: TcpStream) -> Result<u64, String> {
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// `bench tcp-send ADDR BYTES STREAMS`: opens STREAMS connections
/// (retrying while the sink starts), writes BYTES over them (an equal share
/// each, a thread each) and prints the rate in bytes per second, from the
/// first connect to the sink's close of the last (so bytes still queued
/// count).
pub fn tcp_send(addr: &str, bytes: u64, streams: u32) -> Result<(), String> {
    if streams == 0 {
        return Err("tcp-send: no streams".into());
    }
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let conns = (0..streams)
        .map(|_| loop {
            match TcpStream::connect(addr) {
                Ok(c) => break Ok(c),
                Err(e) if Instant::now() >= deadline => break Err(format!("connect {addr}: {e}")),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let share = bytes / u64::from(streams);
    let writers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            // The first stream also carries the remainder.
            let mine = share
                + if i == 0 {
                    bytes % u64::from(streams)
                } else {
                    0
                };
            std::thread::spawn(move || fill(conn, mine))
        })
        .collect();
    for writer in writers {
        writer.join().map_err(|_| "a sender thread panicked")??;
    }
    println!("{:.0}", bytes as f64 / started.elapsed().as_secs_f64());
    Ok(())
}

/// Writes `bytes` to `conn`, then waits for the sink to close it (then
/// every byte arrived).
fn fill(mut conn: TcpStream, bytes: u64) -> Result<(), String> {
    let buf = vec![0x5au8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        conn.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        left -= n as u64;
    }
    conn.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let _ = conn.read(&mut [0u8; 1]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_print() {
        assert_eq!(Shape::parse("loopback"), Ok(Shape::Loopback));
        assert_eq!(Shape::parse("10gbit"), Ok(Shape::Shaped { mbit: 10_000 }));
        assert_eq!(Shape::parse("500mbit"), Ok(Shape::Shaped { mbit: 500 }));
        assert_eq!(Shape::parse("1gbit").unwrap().name(), "1gbit");
        assert_eq!(Shape::parse("500mbit").unwrap().name(), "500mbit");
        for bad in ["", "0gbit", "fast", "10gbps", "-1mbit"] {
            assert!(Shape::parse(bad).is_err(), "{bad}");
        }
    }
}
