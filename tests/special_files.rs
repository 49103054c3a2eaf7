//! Named pipes, sockets and devices where files should be, and Ctrl-C at
//! any moment: the binary never waits for ever, refuses what it cannot
//! read in one line per item, carries on with the rest, and leaves no
//! temporary file behind. Every run has a time limit: a child still running
//! then is killed and the test fails, since a hang is the bug looked for.
#![cfg(unix)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Far above what any of these runs takes (about a second each on the demo
/// models), far below forever.
const LIMIT: Duration = Duration::from_secs(60);
/// How soon a run must end after its first Ctrl-C, on a busy machine.
const PROMPTLY: Duration = Duration::from_secs(20);

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `child`'s output once it exits, within `limit`; killed and failed past it.
fn finish_within(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}, killed; stderr:\n{}",
                text(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn send_sigint(child: &Child) {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// The jsonl records as (path, caption or error) pairs.
fn records(out: &Output) -> Vec<(String, Result<String, String>)> {
    text(&out.stdout)
        .lines()
        .map(|line| {
            let record: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let path = record["path"].as_str().unwrap().to_string();
            let result = match (record["caption"].as_str(), record["error"].as_str()) {
                (Some(caption), None) => Ok(caption.to_string()),
                (None, Some(error)) => Err(error.to_string()),
                _ => panic!("{line}"),
            };
            (path, result)
        })
        .collect()
}

/// A named pipe (nobody writes to it) given on the command line, through a
/// link, listed on stdin and found in a folder used to block the run for
/// ever in its open. Each is now refused in one line, without being opened,
/// the images beside them are captioned, and the exit code is 1.
#[test]
fn named_pipes_are_refused_and_the_rest_is_captioned() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("in");
    std::fs::create_dir_all(dir.join("folder")).unwrap();
    std::fs::copy(examples().join("shapes_1.png"), dir.join("good.png")).unwrap();
    std::fs::copy(
        examples().join("shapes_2.png"),
        dir.join("folder/also good.png"),
    )
    .unwrap();
    let pipe = dir.join("pipe.png");
    mkfifo(&pipe);
    std::os::unix::fs::symlink(&pipe, dir.join("link.jpg")).unwrap();
    mkfifo(&dir.join("listed.jpg"));
    mkfifo(&dir.join("folder/in folder.png"));
    // Not named as an image: skipped like any other file that is not one.
    mkfifo(&dir.join("folder/control"));
    let path = |name: &str| dir.join(name).display().to_string();

    let mut cmd = common::caption_command(home.path());
    cmd.args(["-m", "demo", "--format", "jsonl"])
        .args([path("pipe.png"), path("link.jpg"), "-".into()])
        .args([path("good.png"), path("folder")])
        .stdin(Stdio::piped());
    let mut child = spawn(cmd);
    let list = format!("{}\n", path("listed.jpg"));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(list.as_bytes()).unwrap();
    drop(stdin);
    let out = finish_within(child, LIMIT);

    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let refused = ["pipe.png", "link.jpg", "listed.jpg", "folder/in folder.png"];
    let mut expected: Vec<(String, Result<String, String>)> = refused
        .iter()
        .map(|name| (path(name), Err("not a regular file".to_string())))
        .collect();
    expected.push((
        path("good.png"),
        Ok("a small yellow square on a gray background".into()),
    ));
    expected.push((
        path("folder/also good.png"),
        Ok("a large yellow triangle and a large red circle on a white background".into()),
    ));
    assert_eq!(records(&out), expected, "{stderr}");
    for name in refused {
        let line = format!("caption: {}: not a regular file", path(name));
        assert!(stderr.lines().any(|l| l == line), "{line}:\n{stderr}");
    }
}

/// Sockets and devices are not regular files either.
#[test]
fn sockets_and_devices_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let socket = home.path().join("socket.png");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut cmd = common::caption_command(home.path());
    cmd.args(["-m", "demo", "--format", "jsonl"])
        .arg(&socket)
        .arg("/dev/zero")
        .arg(examples().join("shapes_1.png"))
        .stdin(Stdio::null());
    let out = finish_within(spawn(cmd), LIMIT);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let records = records(&out);
    assert_eq!(records.len(), 3, "{records:?}");
    let refused = |shown: String| -> (String, Result<String, String>) {
        (shown, Err("not a regular file".into()))
    };
    assert_eq!(
        records[..2],
        [
            refused(socket.display().to_string()),
            refused("/dev/zero".into())
        ]
    );
    assert!(records[2].1.is_ok(), "{records:?}");
}

/// `caption chat` on a named pipe: refused at once, a setup error.
#[test]
fn chat_refuses_a_named_pipe() {
    let home = tempfile::tempdir().unwrap();
    let pipe = home.path().join("pipe.png");
    mkfifo(&pipe);
    let mut cmd = common::caption_command(home.path());
    cmd.args(["chat", "-m", "demo-blip2"])
        .arg(&pipe)
        .stdin(Stdio::null());
    let out = finish_within(spawn(cmd), LIMIT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// The weight cache's folder, under `home`.
fn packed(home: &Path) -> PathBuf {
    home.join(".cache/caption/packed")
}

/// The names in the weight cache's folder.
fn cache_entries(home: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(packed(home)) else {
        return vec![];
    };
    let mut names: Vec<String> = entries
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A demo run with the weight cache on.
fn cached_run(home: &Path) -> Command {
    let mut cmd = common::caption_command(home);
    cmd.env_remove("CAPTION_NO_WEIGHT_CACHE")
        .args(["-m", "demo"])
        .arg(examples().join("shapes_1.png"))
        .stdin(Stdio::null());
    cmd
}

/// A named pipe under the weight cache file's name used to block the model
/// load for ever; now it is an unusable file, replaced by a good one.
#[test]
fn a_named_pipe_in_the_weight_cache_is_replaced_not_waited_on() {
    if !caption::nn::packed_kernels_available() {
        return; // nothing is packed, so there is no cache file to read
    }
    let home = tempfile::tempdir().unwrap();
    let first = finish_within(spawn(cached_run(home.path())), LIMIT);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let [name] = &cache_entries(home.path())[..] else {
        panic!("{:?}", cache_entries(home.path()));
    };
    let file = packed(home.path()).join(name);
    std::fs::remove_file(&file).unwrap();
    mkfifo(&file);

    let out = finish_within(spawn(cached_run(home.path())), LIMIT);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout), text(&first.stdout));
    assert!(
        stderr.contains("replacing the file there") && stderr.contains("not a regular file"),
        "{stderr}"
    );
    assert!(std::fs::metadata(&file).unwrap().is_file());
    assert_eq!(cache_entries(home.path()), std::slice::from_ref(name));
}

/// Ctrl-C while the model loads (the weight cache being written) used to
/// kill the process outright and leave the cache's temporary file, as large
/// as the model, behind. Now the first Ctrl-C ends the run at once with
/// exit code 130 and deletes it. The run reads its list from stdin, kept
/// open, so a Ctrl-C that comes after the load still meets a run that is
/// preparing, not captioning.
#[test]
fn ctrl_c_while_the_model_loads_stops_at_once_and_leaves_no_temporary_file() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = common::caption_command(home.path());
    cmd.env_remove("CAPTION_NO_WEIGHT_CACHE")
        .args(["-m", "demo", "-"])
        .stdin(Stdio::piped());
    let child = spawn(cmd);
    let seen = if caption::nn::packed_kernels_available() {
        wait_for_the_temporary_file(home.path())
    } else {
        // Nothing is packed, so nothing is written: any moment will do.
        std::thread::sleep(Duration::from_millis(500));
        false
    };
    send_sigint(&child);
    let out = finish_within(child, PROMPTLY);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert_eq!(text(&out.stdout), "");
    let left: Vec<String> = cache_entries(home.path())
        .into_iter()
        .filter(|name| name.starts_with(".pack-"))
        .collect();
    assert!(
        left.is_empty(),
        "left {left:?} (Ctrl-C sent while writing: {seen})"
    );
}

/// Whether the weight cache's temporary file was seen (our kernels pack
/// into it as they go) before the load ended: watched without a pause, as
/// the demo model packs in milliseconds.
fn wait_for_the_temporary_file(home: &Path) -> bool {
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        let names = cache_entries(home);
        if names.iter().any(|name| name.starts_with(".pack-")) {
            return true;
        }
        if names.iter().any(|name| name.ends_with(".pack")) {
            return false; // written whole: the load is over
        }
    }
    false
}

/// Ctrl-C while the `-` list is read from a terminal or a pipe that stays
/// open: the first one ends the run, exit code 130.
#[test]
fn ctrl_c_while_reading_the_list_on_stdin_stops_at_once() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = common::caption_command(home.path());
    cmd.args(["-m", "demo", "-"]).stdin(Stdio::piped());
    let mut child = spawn(cmd);
    let mut stdin = child.stdin.take().unwrap();
    let listed = format!("{}\n", examples().join("shapes_1.png").display());
    stdin.write_all(listed.as_bytes()).unwrap();
    // The demo model loads in about a second; the run then waits on stdin,
    // which stays open (a Ctrl-C that comes earlier must end it all the same).
    std::thread::sleep(Duration::from_secs(2));
    send_sigint(&child);
    let out = finish_within(child, PROMPTLY);
    drop(stdin);
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
}

/// The reproduction: Ctrl-C while a URL's download hung took 60 to
/// 90 s (the download's timeout) and dropped the batch being loaded. Now
/// the run stops at once: the image captioned before is written whole, the
/// hung one is not done, and the exit code is 130.
#[test]
fn ctrl_c_while_a_download_hangs_stops_at_once() {
    use std::io::{BufRead, BufReader};
    let home = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/never.png", listener.local_addr().unwrap());
    let (asked, request_came) = std::sync::mpsc::channel();
    // Reads the request, then never answers (the connection stays open).
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
            line.clear();
        }
        asked.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(600));
        drop(stream);
    });
    let mut cmd = common::caption_command(home.path());
    cmd.args(["-m", "demo", "--format", "jsonl", "--batch-size", "1"])
        .arg(examples().join("shapes_1.png"))
        .arg(&url);
    let mut child = spawn(cmd);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    request_came.recv_timeout(LIMIT).unwrap();
    let asked_at = Instant::now();
    send_sigint(&child);
    let out = finish_within(child, PROMPTLY);
    assert!(
        asked_at.elapsed() < Duration::from_secs(5),
        "took {:?}",
        asked_at.elapsed()
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let record: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert!(record["caption"].is_string(), "{first}");
    assert_eq!(rest, "", "nothing for the download that never came");
    assert!(
        text(&out.stderr).contains("interrupted after 1 of 2 images"),
        "{}",
        text(&out.stderr)
    );
}
