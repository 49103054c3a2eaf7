//! The `caption` binary as scripts use it: stdout, stderr and exit codes, on
//! the tiny fixture model, through a model folder and through an offline
//! Hugging Face cache.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("models/blip-tiny")
}

fn image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

/// The caption transformers printed for `image` without a prompt.
fn reference_text(image: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/blip-tiny.json")).unwrap(),
    )
    .unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["image"] == image && c["prompt"].is_null())
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The binary on the fixtures, pixels as stored (as transformers reads them).
fn caption(home: &Path) -> Command {
    let mut cmd = common::caption_command(home);
    cmd.arg("--no-exif-rotate");
    cmd
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Every CLI test's environment: user configuration removed, the harness's
/// kernel choice (CI runs the suite once with `CAPTION_KERNELS=portable`)
/// passed through untouched.
#[test]
fn the_clean_environment_keeps_the_kernel_choice() {
    use std::ffi::OsStr;
    let home = tempfile::tempdir().unwrap();
    let cmd = common::caption_command(home.path());
    let envs: std::collections::HashMap<_, _> = cmd.get_envs().collect();
    for var in common::CLEARED_VARS {
        assert!(envs.contains_key(OsStr::new(var)), "{var} not cleared");
    }
    for var in common::KEPT_VARS {
        assert!(!envs.contains_key(OsStr::new(var)), "{var} touched");
    }
    assert_eq!(envs[OsStr::new("HOME")], Some(home.path().as_os_str()));
}

#[test]
fn one_image_prints_the_caption_alone() {
    let home = tempfile::tempdir().unwrap();
    let out = caption(home.path())
        .arg("-m")
        .arg(model_dir())
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n", reference_text("chelsea.png")));
}

#[test]
fn several_images_print_path_tab_caption_and_bad_files_fail_the_run() {
    let home = tempfile::tempdir().unwrap();
    let broken = home.path().join("broken.jpg");
    std::fs::write(&broken, b"this is not a picture").unwrap();
    let missing = home.path().join("missing.png");
    let out = caption(home.path())
        .arg("-m")
        .arg(model_dir())
        .args([
            image("chelsea.png"),
            broken.clone(),
            missing.clone(),
            image("rgba.png"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let expected = format!(
        "{}\t{}\n{}\t{}\n",
        image("chelsea.png").display(),
        reference_text("chelsea.png"),
        image("rgba.png").display(),
        reference_text("rgba.png")
    );
    assert_eq!(stdout(&out), expected);
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "one line per failed file: {err}");
    // Paths that do not exist are found while gathering inputs, before any
    // image is decoded, so they are reported first.
    assert!(lines[0].contains(&missing.display().to_string()), "{err}");
    assert!(lines[1].contains(&broken.display().to_string()), "{err}");
}

#[test]
fn jsonl_has_one_record_per_image_with_errors_inline() {
    let home = tempfile::tempdir().unwrap();
    let empty = home.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let out = caption(home.path())
        .args(["--format", "jsonl", "--batch-size", "2", "-m"])
        .arg(model_dir())
        .args([image("palette.png"), empty.clone(), image("one_pixel.png")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let records: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["caption"], reference_text("palette.png"));
    assert_eq!(records[1]["path"], empty.display().to_string());
    assert!(
        records[1]["error"].as_str().unwrap().contains("empty"),
        "{}",
        records[1]
    );
    assert!(records[1].get("caption").is_none());
    assert_eq!(records[2]["caption"], reference_text("one_pixel.png"));
}

#[test]
fn a_cached_hub_model_loads_offline_by_repo_id_and_by_commit() {
    let home = tempfile::tempdir().unwrap();
    let hf_home = home.path().join("hf");
    let commit = "3b7c1d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8";
    common::populate_hub_cache(&hf_home, "fixture-org/blip-tiny", commit, &model_dir());
    for spec in [
        "fixture-org/blip-tiny".to_string(),
        format!("fixture-org/blip-tiny@{commit}"),
    ] {
        let out = caption(home.path())
            .env("HF_HOME", &hf_home)
            .env("HF_HUB_OFFLINE", "1")
            .args(["-m", &spec])
            .arg(image("chelsea.png"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{spec}: {}", stderr(&out));
        assert_eq!(stdout(&out), format!("{}\n", reference_text("chelsea.png")));
    }
}

#[test]
fn an_uncached_model_offline_fails_with_one_clear_line() {
    let home = tempfile::tempdir().unwrap();
    let out = caption(home.path())
        .env("HF_HOME", home.path().join("empty-cache"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["-m", "fixture-org/not-downloaded"])
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("fixture-org/not-downloaded"), "{err}");
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("--model PATH"),
        "{err}"
    );
}

#[test]
fn models_lists_aliases_and_their_cache_state() {
    let home = tempfile::tempdir().unwrap();
    let out = common::caption_command(home.path())
        .arg("models")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let base = text
        .lines()
        .find(|l| l.starts_with("blip-base\t"))
        .expect("blip-base listed");
    assert!(
        base.contains("Salesforce/blip-image-captioning-base") && base.ends_with("\tno"),
        "{base}"
    );
}

#[test]
fn usage_errors_exit_with_two() {
    let home = tempfile::tempdir().unwrap();
    let no_images = caption(home.path()).output().unwrap();
    assert_eq!(no_images.status.code(), Some(2));
    let bad_model = caption(home.path())
        .args(["-m", "not a model"])
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert_eq!(bad_model.status.code(), Some(2));
    assert!(
        stderr(&bad_model).contains("unknown model"),
        "{}",
        stderr(&bad_model)
    );
}

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let home = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> = (0..40).map(|_| image("one_pixel.png")).collect();
    let mut child = caption(home.path())
        .arg("-m")
        .arg(model_dir())
        .args(&images)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, then close our end like `head -1` does.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    let _ = stdout.read(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

/// transformers' texts for a decoding setting recorded on `image`.
fn reference_generation(setting: &str, image: &str) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/blip-tiny-generate.json")).unwrap(),
    )
    .unwrap();
    let case = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["setting"] == setting && c["image"] == image)
        .unwrap_or_else(|| panic!("no recorded {setting} on {image}"));
    serde_json::from_value(case["texts"].clone()).unwrap()
}

#[test]
fn beam_flags_print_the_best_captions_ranked() {
    let home = tempfile::tempdir().unwrap();
    let best_two = |format: &str| {
        caption(home.path())
            .args([
                "--beams",
                "3",
                "--num-return",
                "2",
                "--length-penalty",
                "0.5",
            ])
            .args(["--format", format])
            .arg("-m")
            .arg(model_dir())
            .arg(image("chelsea.png"))
            .output()
            .unwrap()
    };
    let out = best_two("jsonl");
    assert!(out.status.success(), "{}", stderr(&out));
    let records: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected = reference_generation("beams3_lp0.5_return2", "chelsea.png");
    assert_eq!(records.len(), 2);
    for (i, (record, text)) in records.iter().zip(&expected).enumerate() {
        assert_eq!(record["caption"], text.as_str());
        assert_eq!(record["rank"], i + 1);
        assert!(record["score"].as_f64().unwrap() < 0.0);
    }
    // Text mode: one line per returned caption.
    let out = best_two("text");
    assert_eq!(stdout(&out), format!("{}\n{}\n", expected[0], expected[1]));
}

#[test]
fn repetition_and_ngram_flags_reach_the_decoder() {
    let home = tempfile::tempdir().unwrap();
    for (flags, setting) in [
        (&["--repetition-penalty", "1.5"][..], "greedy_repetition1.5"),
        (&["--no-repeat-ngram", "2"][..], "greedy_ngram2"),
        (&["--min-tokens", "12"][..], "greedy_min_new12"),
        (&["--max-tokens", "5"][..], "greedy_max5"),
    ] {
        let out = caption(home.path())
            .args(flags)
            .arg("-m")
            .arg(model_dir())
            .arg(image("one_pixel.png"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let expected = reference_generation(setting, "one_pixel.png");
        assert_eq!(stdout(&out), format!("{}\n", expected[0]), "{flags:?}");
    }
}

#[test]
fn sampling_with_a_seed_is_the_same_for_every_batch_size() {
    let home = tempfile::tempdir().unwrap();
    let images = ["chelsea.png", "rgba.png", "one_pixel.png", "wide.png"].map(image);
    let run = |batch: &str, seed: &str| {
        let out = caption(home.path())
            .args([
                "--sample",
                "--temperature",
                "1.5",
                "--seed",
                seed,
                "--batch-size",
                batch,
            ])
            .arg("-m")
            .arg(model_dir())
            .args(&images)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let one = run("1", "7");
    assert_eq!(one.lines().count(), 4);
    assert_eq!(run("3", "7"), one);
    assert_eq!(run("4", "7"), one);
    assert_ne!(run("1", "8"), one);
}

#[test]
fn impossible_decoding_settings_are_usage_errors() {
    let home = tempfile::tempdir().unwrap();
    for flags in [
        &["--num-return", "3"][..],
        &["--sample", "--beams", "2"][..],
        &["--sample", "--temperature", "0"][..],
        &["--sample", "--top-p", "1.5"][..],
    ] {
        let out = caption(home.path())
            .args(flags)
            .arg("-m")
            .arg(model_dir())
            .arg(image("chelsea.png"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{flags:?}: {err}");
        assert!(stdout(&out).is_empty());
    }
}

/// transformers' BLIP never applies a checkpoint's generation_config.json (its
/// generate() hands over to the text decoder, whose config is built from
/// text_config); neither do we, and we say so.
#[test]
fn a_blip_generation_config_is_reported_and_not_applied() {
    let home = tempfile::tempdir().unwrap();
    let model = home.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    std::fs::write(
        model.join("generation_config.json"),
        r#"{"num_beams": 3, "max_new_tokens": 2, "bos_token_id": 191}"#,
    )
    .unwrap();
    let out = caption(home.path())
        .arg("-m")
        .arg(&model)
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n", reference_text("chelsea.png")));
    assert!(
        stderr(&out).contains("generation_config.json"),
        "{}",
        stderr(&out)
    );
}

/// One usage error: exit 2, one line on stderr, nothing on stdout.
fn assert_one_line_error(out: &Output, what: &str) -> String {
    assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(out));
    assert!(out.stdout.is_empty(), "{what}");
    let err = stderr(out);
    assert_eq!(err.lines().count(), 1, "{what}: {err}");
    err
}

#[test]
fn asking_a_captioning_model_is_refused_not_silently_captioned() {
    let home = tempfile::tempdir().unwrap();
    let out = caption(home.path())
        .args(["--ask", "what is it?", "-m"])
        .arg(model_dir())
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, "caption model with --ask");
    assert!(
        err.contains("captioning model") && err.contains("blip-vqa-base"),
        "{err}"
    );
    // An alias says so before anything is downloaded.
    let out = caption(home.path())
        .env("HF_HOME", home.path().join("empty-cache"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["--ask", "what is it?", "-m", "blip-large"])
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, "caption alias with --ask");
    assert!(err.contains("captioning model"), "{err}");
}

#[test]
fn ask_defaults_to_the_vqa_model_and_rejects_empty_questions() {
    let home = tempfile::tempdir().unwrap();
    let out = caption(home.path())
        .env("HF_HOME", home.path().join("empty-cache"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["--ask", "what is it?"])
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, "default VQA model, not cached");
    assert!(err.contains("Salesforce/blip-vqa-base"), "{err}");
    for question in ["", "   "] {
        let out = caption(home.path())
            .args(["--ask", "what is it?", "--ask", question, "-m"])
            .arg(model_dir())
            .arg(image("chelsea.png"))
            .output()
            .unwrap();
        let err = assert_one_line_error(&out, "empty question");
        assert!(err.contains("--ask number 2 is empty"), "{err}");
    }
}

fn vqa_dir() -> PathBuf {
    fixtures().join("models/blip-vqa-tiny")
}

/// transformers' greedy answer to `question` about `image`.
fn reference_answer(image: &str, question: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/blip-vqa-tiny.json")).unwrap(),
    )
    .unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["image"] == image && c["question"] == question)
        .unwrap()["greedy"]["text"]
        .as_str()
        .unwrap()
        .to_string()
}

fn ask(home: &Path, questions: &[&str], images: &[&str], format: &str) -> Output {
    let mut cmd = caption(home);
    for q in questions {
        cmd.args(["--ask", q]);
    }
    cmd.args(["--format", format, "-m"]).arg(vqa_dir());
    for name in images {
        cmd.arg(image(name));
    }
    cmd.output().unwrap()
}

#[test]
fn ask_prints_the_answer_and_several_questions_equal_one_per_run() {
    let home = tempfile::tempdir().unwrap();
    let questions = [
        "what is in the picture?",
        "how many people are there?",
        "is it a dog?",
    ];
    let out = ask(home.path(), &questions[..1], &["astronaut.jpg"], "text");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("{}\n", reference_answer("astronaut.jpg", questions[0]))
    );
    // All questions in one run, on two images: path, question, answer per line,
    // each answer what that question alone gives.
    let images = ["astronaut.jpg", "wide.png"];
    let out = ask(home.path(), &questions, &images, "text");
    assert!(out.status.success(), "{}", stderr(&out));
    let mut expected = String::new();
    for name in images {
        for q in questions {
            let alone = ask(home.path(), &[q], &[name], "text");
            let answer = stdout(&alone).trim_end_matches('\n').to_string();
            assert_eq!(answer, reference_answer(name, q));
            expected += &format!("{}\t{q}\t{answer}\n", image(name).display());
        }
    }
    assert_eq!(stdout(&out), expected);
}

#[test]
fn ask_jsonl_records_path_question_and_answer() {
    let home = tempfile::tempdir().unwrap();
    let questions = ["what color is the cat?", "is it a dog?"];
    let out = ask(home.path(), &questions, &["chelsea.png"], "jsonl");
    assert!(out.status.success(), "{}", stderr(&out));
    let records: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2);
    for (record, q) in records.iter().zip(questions) {
        assert_eq!(
            record,
            &serde_json::json!({
                "path": image("chelsea.png").display().to_string(),
                "question": q,
                "answer": reference_answer("chelsea.png", q),
            })
        );
    }
}

#[test]
fn a_vqa_model_without_a_question_is_a_usage_error() {
    let home = tempfile::tempdir().unwrap();
    let out = caption(home.path())
        .arg("-m")
        .arg(vqa_dir())
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, "VQA model without --ask");
    assert!(err.contains("--ask"), "{err}");
}

/// A one-thread HTTP server on loopback: `/NAME` serves fixture image NAME,
/// anything else 404. Returns its base address.
fn serve_images() -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                    break;
                }
            }
            let name = request
                .split(' ')
                .nth(1)
                .unwrap_or("/")
                .trim_start_matches('/');
            let (status, body) = match std::fs::read(image(name)) {
                Ok(bytes) if !name.is_empty() => ("200 OK", bytes),
                _ => ("404 Not Found", b"no such image".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    address
}

#[test]
fn images_can_be_given_as_urls() {
    let home = tempfile::tempdir().unwrap();
    let base = serve_images();
    let good = format!("{base}/chelsea.png");
    let missing = format!("{base}/nothing.png");
    let out = caption(home.path())
        .args(["--format", "jsonl", "-m"])
        .arg(model_dir())
        .args([&good, &missing])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let records: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[0]["path"], good.as_str());
    assert_eq!(
        records[0]["caption"],
        reference_text("chelsea.png").as_str()
    );
    assert_eq!(records[1]["path"], missing.as_str());
    assert!(
        records[1]["error"].as_str().unwrap().contains("404"),
        "{records:?}"
    );
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    // The size cap.
    let err = caption::batch::fetch::download(&good, 100).unwrap_err();
    assert!(err.contains("larger than 100 bytes"), "{err}");
}

/// The weight cache from the command line: the first run saves it under the
/// cache folder and says so in one note, later runs use it silently and
/// print the same captions, and `--no-weight-cache` neither reads nor
/// writes it. (Packing, and so the cache, needs the AVX-512 kernels.)
#[test]
fn the_first_run_saves_the_weight_cache_and_later_runs_use_it() {
    let home = tempfile::tempdir().unwrap();
    let packed = home.path().join(".cache/caption/packed");
    let run = |extra: &[&str]| {
        let out = caption(home.path())
            .env_remove("CAPTION_NO_WEIGHT_CACHE")
            .arg("-m")
            .arg(model_dir())
            .args(extra)
            .arg(image("chelsea.png"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), format!("{}\n", reference_text("chelsea.png")));
        stderr(&out)
    };
    let files = || -> Vec<PathBuf> {
        std::fs::read_dir(&packed)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    assert_eq!(run(&["--no-weight-cache"]), "");
    assert!(files().is_empty(), "{:?}", files());
    let first = run(&[]);
    if !caption::nn::packed_kernels_available() {
        assert_eq!(first, "");
        assert!(files().is_empty(), "{:?}", files());
        return;
    }
    let saved = files();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(first.lines().count(), 1, "{first}");
    assert!(
        first.starts_with("caption: note: ")
            && first.contains("saved the weights")
            && first.contains(&saved[0].display().to_string()),
        "{first}"
    );
    let modified = std::fs::metadata(&saved[0]).unwrap().modified().unwrap();
    assert_eq!(run(&[]), "");
    assert_eq!(files(), saved);
    assert_eq!(
        std::fs::metadata(&saved[0]).unwrap().modified().unwrap(),
        modified
    );
    // -q keeps even the first run's note to itself.
    std::fs::remove_file(&saved[0]).unwrap();
    assert_eq!(run(&["-q"]), "");
    assert_eq!(files(), saved);
}

/// The completion scripts and the manual page come from the same clap
/// definitions as the flags, and `completions` is a command, not two
/// image paths.
#[test]
fn completions_and_the_manual_page_are_generated_from_the_flags() {
    let home = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = common::caption_command(home.path())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        // Each shell names the long flags its own way (fish: `-l model`).
        assert!(
            script.contains("model") && script.contains("ask"),
            "{shell}"
        );
        assert!(
            script.contains("completions") && script.contains("chat"),
            "{shell}"
        );
    }
    let out = common::caption_command(home.path())
        .args(["completions", "nushell"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = common::caption_command(home.path())
        .arg("man")
        .output()
        .unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH caption 1") && page.contains("\\-\\-model"));
}
