//! The `skipped: <reason>` lines of host-dependent tests, found after a run.
//!
//! A test that needs `/dev/kvm`, hugepages or userfaultfd prints one
//! `skipped:` line and passes when the host lacks them. A test runner hides a
//! passing test's output, so without help a skipped test looks like a passed
//! one in CI's log. Two sources are read:
//! - nextest's JUnit report (profile `ci` in `.config/nextest.toml` stores
//!   passing tests' output in it), which names each test;
//! - `cargo test -- --show-output`'s log, whose `---- NAME stdout ----`
//!   headers name the test whose output follows.

use std::path::Path;

/// One test that printed `skipped:`.
pub struct Skip {
    /// The test, as the runner names it.
    pub test: String,
    /// What follows `skipped:`.
    pub reason: String,
}

/// Prints every skip, one line each, under a heading, so the lines stand
/// together at the end of a step's output.
pub fn print(skips: &[Skip]) {
    if skips.is_empty() {
        return;
    }
    println!("\nxtask: {} test(s) printed `skipped:`:", skips.len());
    for s in skips {
        println!("skipped: {}: {}", s.test, s.reason);
    }
}

/// The table note for `skips`.
pub fn note(skips: &[Skip]) -> String {
    match skips.len() {
        0 => String::new(),
        1 => "1 test skipped".to_string(),
        n => format!("{n} tests skipped"),
    }
}

/// The reason when `line` is a skip line.
fn reason(line: &str) -> Option<&str> {
    line.trim().strip_prefix("skipped:").map(str::trim)
}

/// The skips in nextest's JUnit report at `path`.
pub fn from_junit(path: &Path) -> Result<Vec<Skip>, String> {
    let xml = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read nextest's JUnit report {}: {e}", path.display()))?;
    let mut skips = Vec::new();
    let mut rest = xml.as_str();
    while let Some(start) = rest.find("<testcase ") {
        rest = &rest[start..];
        let head_end = rest.find('>').unwrap_or(rest.len());
        let head = &rest[..head_end];
        let end = if head.ends_with('/') {
            head_end
        } else {
            rest.find("</testcase>").unwrap_or(rest.len())
        };
        let case = &rest[..end];
        let test = match (attribute(head, "classname"), attribute(head, "name")) {
            (Some(class), Some(name)) => format!("{class} {name}"),
            (None, Some(name)) => name,
            _ => "?".to_string(),
        };
        if let Some(out) = element(case, "system-out") {
            for line in out.lines() {
                if let Some(reason) = reason(line) {
                    skips.push(Skip {
                        test: test.clone(),
                        reason: reason.to_string(),
                    });
                }
            }
        }
        rest = &rest[end..];
    }
    Ok(skips)
}

/// The value of `name="..."` in a tag's text, unescaped.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(unescape(&tag[start..start + len]))
}

/// The text inside `<name>...</name>`, unescaped (CDATA kept as is).
fn element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&format!("</{name}>"))?;
    let text = &xml[start..start + len];
    Some(match text.trim().strip_prefix("<![CDATA[") {
        Some(cdata) => cdata.trim_end().trim_end_matches("]]>").to_string(),
        None => unescape(text),
    })
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The skips in the log of `cargo test ... -- --show-output`: libtest
/// prints each passing test's output under `---- NAME stdout ----`, after
/// cargo's `Running <binary>` line.
pub fn from_libtest_log(log: &str) -> Vec<Skip> {
    let mut skips = Vec::new();
    let mut binary = "";
    let mut test = String::from("?");
    for line in log.lines() {
        let trimmed = line.trim();
        if let Some(running) = trimmed.strip_prefix("Running ") {
            binary = running.split(" (").next().unwrap_or(running);
            test = binary.to_string();
        } else if let Some(name) = trimmed
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            test = format!("{binary} {name}");
        } else if let Some(reason) = reason(line) {
            skips.push(Skip {
                test: test.clone(),
                reason: reason.to_string(),
            });
        }
    }
    skips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_skips_are_named_by_test() {
        let dir = std::env::temp_dir().join(format!("xtask-skips-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("junit.xml");
        std::fs::write(
            &path,
            r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="nextest-run" tests="3">
  <testsuite name="ramblock-kvm::memslots" tests="3">
    <testcase name="plain" classname="ramblock-kvm::memslots" time="0.1"/>
    <testcase name="readonly" classname="ramblock-kvm::memslots" time="0.1">
      <system-out>host KVM: x
skipped: host lacks KVM_CAP_READONLY_MEM &amp; more
</system-out>
    </testcase>
    <testcase name="quiet" classname="ramblock-kvm::memslots" time="0.1">
      <system-out>nothing to see</system-out>
    </testcase>
  </testsuite>
</testsuites>"#,
        )
        .unwrap();
        let skips = from_junit(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(skips.len(), 1);
        assert_eq!(skips[0].test, "ramblock-kvm::memslots readonly");
        assert_eq!(skips[0].reason, "host lacks KVM_CAP_READONLY_MEM & more");
        assert_eq!(note(&skips), "1 test skipped");
    }

    #[test]
    fn libtest_skips_are_named_by_binary_and_test() {
        let log = "\
     Running tests/memslots.rs (target/debug/deps/memslots-0123)

running 2 tests
test a ... ok
test b ... ok

successes:

---- b stdout ----
skipped: no /dev/kvm (No such file or directory)

successes:
    a
    b
";
        let skips = from_libtest_log(log);
        assert_eq!(skips.len(), 1);
        assert_eq!(skips[0].test, "tests/memslots.rs b");
        assert_eq!(skips[0].reason, "no /dev/kvm (No such file or directory)");
    }
}
