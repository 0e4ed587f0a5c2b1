//! `cove bench` runs its cases for real and reports them: a short
//! streaming run (its own daemon, a sandbox per round) with the rates and
//! the CPU time of each party, and nothing left behind. The figures are
//! not judged (speed is measured, not tested); only that they were taken.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use serde_json::Value;

#[test]
fn the_stream_case_reports_rates_and_each_partys_cpu_time() {
    if !common::root() {
        return;
    }
    let child = Command::new(env!("CARGO_BIN_EXE_cove"))
        .args([
            "bench",
            "-n",
            "2",
            "--warmup",
            "0",
            "--only",
            "stream",
            "--stream-mib",
            "16",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cove bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["stream_mib"], 16);
    let rates = report["rates"].as_array().unwrap();
    let rate = |name: &str| -> &Value {
        rates
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no {name:?} in {rates:#?}"))
    };
    let value = |name: &str, unit: &str| -> f64 {
        let r = rate(name);
        assert_eq!(r["unit"], unit, "{r}");
        let v = r["value"].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{name}: {r}");
        v
    };
    let pipe = value("pipe: head -c N /dev/zero", "MiB/s");
    let sse = value("SSE: head -c N /dev/zero", "MiB/s");
    let versus = &rate("SSE: head -c N /dev/zero")["versus"];
    assert_eq!(versus[0], "pipe: head -c N /dev/zero");
    let ratio = versus[1].as_f64().unwrap();
    assert!((ratio - sse / pipe).abs() < 1e-9, "{versus}");
    for party in ["client", "daemon", "agent"] {
        value(&format!("SSE: CPU time of the {party}"), "ms/GiB");
    }
    // Its daemon stopped and its cgroup parent went with it.
    for hierarchy in ["pids", "memory", ""] {
        let parent = std::path::Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join(format!("cove-bench-http-{pid}"));
        assert!(!parent.exists(), "{} is left", parent.display());
    }
    assert!(!common::host_has_process_with(&format!(
        "cove-bench-http-{pid}"
    )));
}
