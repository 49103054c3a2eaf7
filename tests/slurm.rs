//! `--shard auto` on a real scheduler: a one-node SLURM cluster (Debian's
//! `slurm-wlm`, controller and node daemons on this machine, `auth/none`)
//! runs the job scripts README.md shows, as a 4-task job array and as one
//! job of 2 `srun` tasks, captioning a folder with the built-in demo model.
//! Together the tasks' outputs must be exactly one single-process run: every
//! image once, the same captions.
//!
//! Without `slurmctld` on the PATH the test says so and passes, unless
//! `CAPTION_REQUIRE_SLURM` is set (`.ci/run` installs SLURM and sets it).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::CLEARED_VARS;

/// How long a job may take before the test gives up on it (each task
/// captions 44 small pictures with a tiny model: seconds).
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

fn found(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output_of(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A controller and a node on this machine, in a folder of their own; both
/// stopped (by their pid files) when dropped, also when the test fails.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["state", "spool", "log"] {
            fs::create_dir(d.join(sub)).unwrap();
        }
        let host = output_of("hostname", &["-s"]);
        let user = output_of("id", &["-un"]);
        let conf = format!(
            "ClusterName=captiontest\n\
             SlurmctldHost={host}(127.0.0.1)\n\
             SlurmctldPort={ctld}\n\
             SlurmdPort={slurmd}\n\
             AuthType=auth/none\n\
             CredType=cred/none\n\
             SlurmUser={user}\n\
             SlurmdUser={user}\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldLogFile={d}/log/ctld.log\n\
             SlurmdLogFile={d}/log/d.log\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             SwitchType=switch/none\n\
             MpiDefault=none\n\
             ReturnToService=2\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_CPU\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN\n\
             PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
            ctld = free_port(),
            slurmd = free_port(),
            d = d.display(),
        );
        fs::write(d.join("slurm.conf"), conf).unwrap();
        let cluster = Cluster { dir };
        for daemon in ["slurmctld", "slurmd"] {
            let status = cluster
                .command(daemon)
                .arg("-f")
                .arg(cluster.conf())
                .status();
            assert!(
                status.as_ref().is_ok_and(|s| s.success()),
                "{daemon} did not start: {status:?}\n{}",
                cluster.logs()
            );
        }
        cluster.wait_for_an_idle_node();
        cluster
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// A SLURM command for this cluster.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", self.conf());
        cmd
    }

    fn logs(&self) -> String {
        ["ctld.log", "d.log"]
            .iter()
            .map(|f| fs::read_to_string(self.dir.path().join("log").join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn wait_for_an_idle_node(&self) {
        let start = Instant::now();
        loop {
            let out = self.command("sinfo").args(["-h", "-o", "%t"]).output();
            if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the node never became idle\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Submits `script` with `sbatch --wait` and the test's environment
    /// for `caption`, and waits for the whole job.
    fn run_job(&self, script: &Path, options: &[&str], home: &Path) {
        let mut sbatch = self.command("sbatch");
        for var in CLEARED_VARS {
            sbatch.env_remove(var);
        }
        let mut child = sbatch
            .env("HOME", home)
            .env("RUST_BACKTRACE", "0")
            .env("CAPTION_NO_WEIGHT_CACHE", "1")
            .env("HF_HUB_OFFLINE", "1")
            .env("CAPTION_BIN", env!("CARGO_BIN_EXE_caption"))
            .arg("--wait")
            .args(options)
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > JOB_TIMEOUT {
                let _ = self
                    .command("scancel")
                    .arg("--user")
                    .arg(output_of("id", &["-un"]))
                    .status();
                let _ = child.kill();
                panic!("the job ran over {JOB_TIMEOUT:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "sbatch {options:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid_file in ["slurmd.pid", "slurmctld.pid"] {
            if let Ok(pid) = fs::read_to_string(self.dir.path().join(pid_file)) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
        // The daemons hold files in the folder until they are gone.
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every task's output file and the shard each said it took.
fn task_outputs(dir: &Path, prefix: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut merged = BTreeMap::new();
    let mut shards = Vec::new();
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix) && (n.ends_with(".jsonl") || n.ends_with(".err")))
        .collect();
    names.sort();
    for name in names {
        let text = fs::read_to_string(dir.join(&name)).unwrap();
        if name.ends_with(".jsonl") {
            common::jsonl_by_path(&text, &mut merged);
        } else {
            let line = text
                .lines()
                .find(|l| l.starts_with("caption: shard "))
                .unwrap_or_else(|| panic!("{name} does not say its shard:\n{text}"));
            shards.push(line.to_string());
        }
    }
    (merged, shards)
}

#[test]
fn a_slurm_job_array_and_srun_tasks_caption_every_image_once() {
    if !found("slurmctld") {
        assert!(
            std::env::var_os("CAPTION_REQUIRE_SLURM").is_none(),
            "CAPTION_REQUIRE_SLURM is set but slurmctld is not installed"
        );
        eprintln!("SLURM is not installed (Debian: slurm-wlm); not tested here");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    fs::create_dir(&home).unwrap();
    let images = work.path().join("images");
    let n = common::demo_picture_folder(&images);

    let single = common::caption_command(&home)
        .env("HF_HUB_OFFLINE", "1")
        .args(["-m", "demo", "--format", "jsonl"])
        .arg(&images)
        .output()
        .unwrap();
    assert!(
        single.status.success(),
        "{}",
        String::from_utf8_lossy(&single.stderr)
    );
    let mut expected = BTreeMap::new();
    common::jsonl_by_path(&String::from_utf8(single.stdout).unwrap(), &mut expected);
    assert_eq!(expected.len(), n);

    let out = work.path().join("out");
    fs::create_dir(&out).unwrap();
    // README's job-array script, with the demo model and the test's folder.
    let array_script = work.path().join("caption-array.sh");
    fs::write(
        &array_script,
        format!(
            "#!/bin/sh\nexec \"$CAPTION_BIN\" -m demo --format jsonl --shard auto {}\n",
            images.display()
        ),
    )
    .unwrap();
    // README's srun form: one job, each of its tasks a share.
    let step_script = work.path().join("caption-srun.sh");
    fs::write(
        &step_script,
        format!(
            "#!/bin/sh\nexec srun sh -c 'exec \"$CAPTION_BIN\" -m demo --format jsonl --shard auto {} \
             > {out}/srun-$SLURM_PROCID.jsonl 2> {out}/srun-$SLURM_PROCID.err'\n",
            images.display(),
            out = out.display()
        ),
    )
    .unwrap();

    let cluster = Cluster::start();
    // Numbered from 1, as many clusters' scripts are: 1-4 is shards 1/4..4/4.
    let array_out = format!("--output={}/array-%a.jsonl", out.display());
    let array_err = format!("--error={}/array-%a.err", out.display());
    cluster.run_job(
        &array_script,
        &["--array=1-4", &array_out, &array_err],
        &home,
    );
    let (merged, mut shards) = task_outputs(&out, "array-");
    shards.sort();
    let said: Vec<String> = (1..=4)
        .map(|k| format!("caption: shard {k}/4 (SLURM array task {k} of 1-4)"))
        .collect();
    assert_eq!(shards, said);
    assert_eq!(merged, expected, "the array's outputs differ from one run");

    cluster.run_job(
        &step_script,
        &[
            "--ntasks=2",
            &format!("--output={}/srun-job.log", out.display()),
        ],
        &home,
    );
    let (merged, mut shards) = task_outputs(&out, "srun-");
    shards.sort();
    assert_eq!(
        shards,
        [
            "caption: shard 1/2 (SLURM task 0 of 2)",
            "caption: shard 2/2 (SLURM task 1 of 2)"
        ]
    );
    assert_eq!(
        merged, expected,
        "the srun tasks' outputs differ from one run"
    );
}
