//! `deploy/kubernetes/toa-shim-daemonset.yaml`: its shape (what a DaemonSet
//! for the helper needs, and what it must not ask for), and that every
//! `toa-shim` command in its script parses with the real binary. No cluster
//! runs here; the pods' shape itself (a parent cgroup, nested pods, one netns
//! each) is tested end to end in examples/tests/ebpf_e2e.rs.

use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn daemonset() -> Yaml {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/toa-shim-daemonset.yaml");
    let text = std::fs::read_to_string(path).expect("read the DaemonSet");
    let mut docs = YamlLoader::load_from_str(&text).expect("valid YAML");
    assert_eq!(docs.len(), 1, "one document");
    docs.remove(0)
}

fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str().unwrap_or_else(|| panic!("{what} is not a string: {y:?}"))
}

#[test]
fn the_daemonset_has_what_the_helper_needs() {
    let ds = daemonset();
    assert_eq!(str_of(&ds["apiVersion"], "apiVersion"), "apps/v1");
    assert_eq!(str_of(&ds["kind"], "kind"), "DaemonSet");
    let spec = &ds["spec"];
    let pod = &spec["template"]["spec"];
    assert_eq!(
        spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"],
        "the selector matches the pods' labels"
    );
    // Only what is needed: no host PID or network namespace.
    assert!(!pod["hostPID"].as_bool().unwrap_or(false), "hostPID is not needed");
    assert!(!pod["hostNetwork"].as_bool().unwrap_or(false), "hostNetwork is not needed");
    let containers = pod["containers"].as_vec().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert!(c["securityContext"]["privileged"].as_bool().unwrap_or(false), "loading BPF needs privileges");

    // Mounts: each names a volume, and the three the helper needs are there.
    let volumes: Vec<(&str, &str)> = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .map(|v| (str_of(&v["name"], "volume name"), str_of(&v["hostPath"]["path"], "hostPath")))
        .collect();
    let mounts: Vec<(&str, &str)> = c["volumeMounts"]
        .as_vec()
        .expect("volumeMounts")
        .iter()
        .map(|m| (str_of(&m["name"], "mount name"), str_of(&m["mountPath"], "mountPath")))
        .collect();
    let host_path_at = |mount_path: &str| -> &str {
        let (name, _) = mounts
            .iter()
            .find(|(_, p)| *p == mount_path)
            .unwrap_or_else(|| panic!("no mount at {mount_path}"));
        volumes.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no volume {name}")).1
    };
    assert_eq!(host_path_at("/sys/fs/bpf"), "/sys/fs/bpf", "pins live on the node's bpffs");
    assert_eq!(host_path_at("/host/sys/fs/cgroup"), "/sys/fs/cgroup", "the node's cgroup root");
    assert_eq!(host_path_at("/sys/kernel/btf"), "/sys/kernel/btf");
    for (name, _) in &mounts {
        assert!(volumes.iter().any(|(n, _)| n == name), "mount {name} has no volume");
    }

    // The script attaches at the node's root, detaches on TERM.
    let script =
        c["args"].as_vec().expect("args").iter().map(|a| str_of(a, "arg")).collect::<Vec<_>>().join("\n");
    assert!(script.contains("toa-shim ebpf attach --cgroup /host/sys/fs/cgroup"), "{script}");
    assert!(script.contains("trap 'toa-shim ebpf detach"), "detach on stop: {script}");
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30) >= 5);
}

/// Every `toa-shim ...` line of the script, run with `--help` appended: clap
/// checks each argument before it honours `--help`, so an unknown flag or a
/// bad value fails here.
#[test]
fn every_command_in_the_script_parses() {
    let ds = daemonset();
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let script: Vec<String> =
        c["args"].as_vec().unwrap().iter().map(|a| str_of(a, "arg").to_owned()).collect();
    let commands: Vec<Vec<String>> = script
        .iter()
        .flat_map(|s| s.lines())
        .map(|l| l.trim().trim_end_matches('&').trim())
        .filter(|l| l.starts_with("toa-shim "))
        .map(|l| l.split_whitespace().skip(1).map(str::to_owned).collect())
        .collect();
    assert!(commands.len() >= 3, "attach, detach and metrics: {commands:?}");
    for args in commands {
        let out = Command::new(env!("CARGO_BIN_EXE_toa-shim")).args(&args).arg("--help").output().unwrap();
        assert!(
            out.status.success(),
            "toa-shim {} does not parse: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
