//! The ratio table, read from criterion's result files.
//!
//! Criterion writes, for every benchmark, `<group>/<function>/new/`
//! `benchmark.json` (the real group and function names; the directory names
//! are sanitized) and `estimates.json` (the median's point estimate, in
//! nanoseconds). Parameterized functions (`BenchmarkId::new(f, p)`) are
//! compared with the baseline of the same parameter.

use crate::Error;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where criterion keeps its results: `criterion` in cargo's target
/// directory.
pub fn criterion_dir() -> Result<PathBuf, Error> {
    Ok(crate::target_dir()?.join("criterion"))
}

/// One measured function.
struct Measurement {
    group: String,
    function: String,
    /// The parameter of a parameterized benchmark, if any.
    value: Option<String>,
    median_ns: f64,
}

/// Every `new/` result under `dir`, or only those written after `since`.
fn collect(dir: &Path, since: Option<SystemTime>, out: &mut Vec<Measurement>) -> Result<(), Error> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            let estimates = path.join("estimates.json");
            let fresh = match since {
                None => true,
                Some(t) => std::fs::metadata(&estimates)
                    .and_then(|m| m.modified())
                    .is_ok_and(|m| m >= t),
            };
            if fresh && estimates.is_file() {
                out.push(read_measurement(&path)?);
            }
        } else {
            collect(&path, since, out)?;
        }
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn read_measurement(dir: &Path) -> Result<Measurement, Error> {
    let bench = read_json(&dir.join("benchmark.json"))?;
    let estimates = read_json(&dir.join("estimates.json"))?;
    let text = |v: &Value| v.as_str().map(str::to_string);
    let group = text(&bench["group_id"]);
    let median = estimates["median"]["point_estimate"].as_f64();
    let (Some(group), Some(median_ns)) = (group, median) else {
        return Err(format!(
            "{}: no group_id or median point_estimate; not a criterion 0.5 result?",
            dir.display()
        )
        .into());
    };
    Ok(Measurement {
        group,
        function: text(&bench["function_id"]).unwrap_or_default(),
        value: text(&bench["value_str"]),
        median_ns,
    })
}

/// A duration in the unit that keeps 3-4 significant digits.
fn human(ns: f64) -> String {
    match ns {
        n if n < 1e3 => format!("{n:.2} ns"),
        n if n < 1e6 => format!("{:.2} µs", n / 1e3),
        n if n < 1e9 => format!("{:.2} ms", n / 1e6),
        n => format!("{:.2} s", n / 1e9),
    }
}

/// Prints the table for every result under `dir` (only those newer than
/// `since`, when given).
pub fn print(dir: &Path, since: Option<SystemTime>) -> Result<(), Error> {
    let mut all = Vec::new();
    collect(dir, since, &mut all)?;
    if all.is_empty() {
        let which = if since.is_some() { "new " } else { "" };
        println!("no {which}criterion results under {}", dir.display());
        return Ok(());
    }
    // (group, parameter) -> function -> median
    let mut figures: BTreeMap<(String, Option<String>), BTreeMap<String, f64>> = BTreeMap::new();
    for m in all {
        figures
            .entry((m.group, m.value))
            .or_default()
            .insert(m.function, m.median_ns);
    }
    let mut rows = vec![[
        "figure".to_string(),
        "function".to_string(),
        "median".to_string(),
        "baseline".to_string(),
        "ratio".to_string(),
    ]];
    for ((group, value), functions) in &figures {
        let figure = match value {
            Some(v) => format!("{group} [{v}]"),
            None => group.clone(),
        };
        let baseline = functions.get("baseline").copied();
        for (function, &median) in functions.iter().filter(|(f, _)| *f != "baseline") {
            let (base, ratio) = match baseline {
                Some(b) => (human(b), format!("{:.3}", median / b)),
                None => ("-".to_string(), "no baseline".to_string()),
            };
            rows.push([figure.clone(), function.clone(), human(median), base, ratio]);
        }
        if functions.len() == 1 && baseline.is_some() {
            rows.push([
                figure,
                "(baseline only)".into(),
                "-".into(),
                human(baseline.unwrap_or_default()),
                "-".into(),
            ]);
        }
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Built whole and written once, ignoring a closed pipe (`| head`).
    let mut table = String::from("\n");
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(col, (cell, w))| {
                let pad = w - cell.chars().count();
                // Names left-aligned, numbers right-aligned.
                if col < 2 {
                    format!("{cell}{}", " ".repeat(pad))
                } else {
                    format!("{}{cell}", " ".repeat(pad))
                }
            })
            .collect();
        table.push_str(line.join("  ").trim_end());
        table.push('\n');
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            table.push_str(&rule.join("  "));
            table.push('\n');
        }
    }
    let _ = std::io::stdout().write_all(table.as_bytes());
    Ok(())
}
