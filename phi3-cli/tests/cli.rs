//! End-to-end tests of the `phi3` binary: the fixture models (no tokenizer: `info`, `bench` and
//! errors) and the built-in demo model (`generate`, `chat`).
//!
//! Every run gets an empty Hugging Face cache and HF_HUB_OFFLINE=1, so nothing touches the
//! network or the user's cache.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn fixture(name: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
    dir.to_str().unwrap().to_string()
}

/// `phi3 args...` with an isolated, offline HF cache (`hf_cache`, or a fresh empty folder).
fn command(args: &[&str], hf_cache: Option<&Path>) -> (Command, Option<tempfile::TempDir>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phi3"));
    cmd.args(args).env("HF_HUB_OFFLINE", "1").env_remove("RUST_LOG");
    let temp = match hf_cache {
        Some(dir) => {
            cmd.env("HF_HUB_CACHE", dir);
            None
        }
        None => {
            let temp = tempfile::tempdir().unwrap();
            cmd.env("HF_HUB_CACHE", temp.path());
            Some(temp)
        }
    };
    (cmd, temp)
}

fn phi3(args: &[&str]) -> Output {
    let (mut cmd, _cache) = command(args, None);
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn phi3_with_stdin(args: &[&str], stdin: &str) -> Output {
    let (mut cmd, _cache) = command(args, None);
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The run failed with exit code `code` and one `error: ...` line on stderr; returns that line.
fn assert_error(out: &Output, code: i32) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "stderr: {stderr}");
    errors[0].to_string()
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

// ---- info ----

#[test]
fn info_prints_the_config_parameters_and_memory() {
    let out = phi3(&["info", "--model", &fixture("gqa-longrope-bf16")]);
    assert_success(&out);
    let stdout = text(&out.stdout);
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with("  ")))
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{stdout}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("layers"), "2");
    assert_eq!(field("kv heads"), "2");
    assert!(field("parameters").contains("(266880)"), "{stdout}");
    assert!(field("rope").starts_with("longrope"), "{stdout}");
    assert_eq!(field("positions"), "max 64, original 16");
    // bf16 weights: two bytes per parameter.
    assert!(field("weights").contains("(533760 bytes, BF16)"), "{stdout}");
    // 2 layers x (K, V) x 2 kv heads x 16 dims x 4 bytes = 512 bytes per token.
    assert_eq!(field("kv cache / token"), "512 B (f32)");
    assert_eq!(field("kv cache"), "32.0 KiB for 64 tokens");
    assert!(field("device").starts_with("cpu"), "{stdout}");
}

#[test]
fn info_context_sets_the_kv_estimate() {
    let out = phi3(&["info", "--model", &fixture("mha-f32-tied"), "--context", "1000"]);
    assert_success(&out);
    assert!(text(&out.stdout).contains(" for 1000 tokens"), "{}", text(&out.stdout));
}

#[test]
fn a_repo_id_resolves_through_the_hf_cache() {
    // A cache laid out as huggingface_hub writes it, holding a copy of a fixture.
    let cache = tempfile::tempdir().unwrap();
    let hash = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.path().join("models--phi3-test--tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    let snapshot = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(fixture("mha-f32-tied")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
    }
    let (mut cmd, _) = command(&["info", "--model", "phi3-test/tiny"], Some(cache.path()));
    let out = cmd.output().unwrap();
    assert_success(&out);
    assert!(text(&out.stdout).contains("phi3-test/tiny"), "{}", text(&out.stdout));

    // Offline and absent from the cache: one clear line.
    let (mut cmd, _) = command(&["info", "--model", "phi3-test/absent"], Some(cache.path()));
    let line = assert_error(&cmd.output().unwrap(), 1);
    assert!(line.contains("phi3-test/absent") && line.contains("Hugging Face cache"), "{line}");
}

// ---- bench ----

const BENCH_KEYS: [&str; 11] = [
    "model",
    "device",
    "threads",
    "prompt_tokens",
    "gen_tokens",
    "load_s",
    "prefill_s",
    "prefill_tokens_per_s",
    "decode_s",
    "decode_tokens_per_s",
    "parameter_count",
];

fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = phi3(args);
    assert_success(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    for key in BENCH_KEYS {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    json
}

#[test]
fn bench_json_has_every_key() {
    let model = fixture("mha-f32-tied");
    let json = bench_json(&[
        "bench",
        "--model",
        &model,
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(json["prompt_tokens"], 8);
    assert_eq!(json["gen_tokens"], 4);
    assert_eq!(json["parameter_count"], 102720);
    assert_eq!(json["model"], model.as_str());
    assert!(json["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["threads"].as_u64().unwrap() >= 1);
}

#[test]
fn bench_table_and_repeat() {
    let out = phi3(&[
        "bench",
        "--model",
        &fixture("mha-f32-tied"),
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--repeat",
        "3",
    ]);
    assert_success(&out);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for header in ["load s", "prefill tok/s", "decode tok/s", "ms/token", "device", "threads"] {
        assert!(lines[0].contains(header), "{header} missing: {stdout}");
    }
}

#[test]
fn bench_dummy_weights_need_only_the_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(&fixture("gqa-longrope-bf16")).join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let model = dir.path().to_str().unwrap();
    for dtype in ["bf16", "f16", "f32"] {
        let json = bench_json(&[
            "bench",
            "--model",
            model,
            "--dummy-weights",
            dtype,
            "--prompt-tokens",
            "20",
            "--gen-tokens",
            "2",
            "--json",
        ]);
        assert_eq!(json["parameter_count"], 266880);
    }
    // Without --dummy-weights the same folder is missing its weights.
    let line = assert_error(&phi3(&["bench", "--model", model, "--json"]), 1);
    assert!(line.contains("safetensors"), "{line}");
}

/// The figures of `bench --sessions` that must be positive and finite.
const SESSIONS_FIGURES: [&str; 11] = [
    "prefill_s",
    "prefill_tokens_per_s",
    "decode_s",
    "decode_tokens_per_s",
    "tpot_ms",
    "single_prefill_s",
    "single_prefill_tokens_per_s",
    "single_decode_s",
    "single_decode_tokens_per_s",
    "single_tpot_ms",
    "tpot_ratio",
];

#[test]
fn bench_sessions_reports_total_and_per_session_speed() {
    // The demo model decodes through `generate`; a fixture without a tokenizer through
    // one-token `append_tokens_greedy` steps.
    let fixture_model = fixture("mha-f32-tied");
    for (model, api) in [(None, "generate"), (Some(fixture_model.as_str()), "append_tokens_greedy")]
    {
        let mut args = vec![
            "bench",
            "--sessions",
            "3",
            "--prompt-tokens",
            "12",
            "--gen-tokens",
            "4",
            "--json",
        ];
        if let Some(m) = model {
            args.extend(["--model", m]);
        }
        let json = bench_json(&args);
        assert_eq!(json["sessions"], 3, "{json}");
        assert_eq!(json["decode_api"], api, "{json}");
        assert_eq!(json["prompt_tokens"], 12);
        assert_eq!(json["gen_tokens"], 4);
        assert_eq!(json["generated_tokens"], 12, "3 sessions x 4 tokens: {json}");
        for key in SESSIONS_FIGURES {
            let x = json[key].as_f64().unwrap_or_else(|| panic!("{key} missing from {json}"));
            assert!(x.is_finite() && x > 0.0, "{key} = {x}: {json}");
        }
        // Sequences per forward pass: at least one, at most the 3 sessions.
        for key in ["prefill_mean_batch", "decode_mean_batch"] {
            let x = json[key].as_f64().unwrap_or_else(|| panic!("{key} missing from {json}"));
            assert!((1.0..=3.0).contains(&x), "{key} = {x}: {json}");
        }
    }
    let out = phi3(&["bench", "--sessions", "3", "--prompt-tokens", "12", "--gen-tokens", "4"]);
    assert_success(&out);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for header in ["sessions", "decode tok/s (total)", "ms/token (1 session)", "ratio", "batch"] {
        assert!(lines[0].contains(header), "{header} missing: {stdout}");
    }
    let line = assert_error(&phi3(&["bench", "--sessions", "2", "--gen-tokens", "0"]), 1);
    assert!(line.contains("--gen-tokens"), "{line}");
}

#[test]
fn bench_longer_than_the_context_is_an_error() {
    let out = phi3(&[
        "bench",
        "--model",
        &fixture("gqa-longrope-bf16"),
        "--prompt-tokens",
        "60",
        "--gen-tokens",
        "10",
    ]);
    let line = assert_error(&out, 1);
    assert!(line.contains("max context of 64"), "{line}");
}

// ---- errors ----

#[test]
fn a_missing_model_folder_is_named() {
    let missing = std::env::temp_dir().join("phi3-no-such-model/dir");
    let missing = missing.to_str().unwrap();
    for sub in ["info", "bench", "generate", "chat"] {
        let mut args = vec![sub, "--model", missing];
        if sub == "generate" {
            args.push("hi");
        }
        let line = assert_error(&phi3(&args), 1);
        assert!(line.contains(missing), "{sub}: {line}");
    }
}

#[test]
fn a_bad_device_is_rejected() {
    let out = phi3(&["info", "--model", &fixture("mha-f32-tied"), "--device", "gpu"]);
    assert_ne!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("gpu") && stderr.contains("cuda:N"), "{stderr}");
}

#[test]
fn negative_max_tokens_is_a_usage_error() {
    for args in [
        &["generate", "--max-tokens", "-5", "hi"][..],
        &["generate", "--max-tokens=-5", "hi"],
        &["chat", "-n", "-1"],
    ] {
        let out = phi3(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("-"), "{args:?}");
    }
}

#[test]
fn text_commands_need_a_tokenizer() {
    let line = assert_error(&phi3(&["generate", "--model", &fixture("mha-f32-tied"), "hi"]), 1);
    assert!(line.contains("tokenizer"), "{line}");
}

#[test]
fn help_of_every_subcommand() {
    for sub in ["generate", "chat", "info", "bench", "perplexity", "quantize"] {
        let out = phi3(&[sub, "--help"]);
        assert_success(&out);
        assert!(text(&out.stdout).contains("--model"), "{sub}");
    }
}

// ---- perplexity against another model folder ----

/// `phi3 quantize` of the mha-f32-tied fixture into a fresh temporary folder (int4 in groups of
/// 32: its projections are 64 wide); returns the temporary folder and the model folder in it.
fn quantized_fixture() -> (tempfile::TempDir, String) {
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("int4-g32");
    let out = out.to_str().unwrap().to_string();
    let run = phi3(&[
        "quantize",
        "--model",
        &fixture("mha-f32-tied"),
        "--weights",
        "int4-g32",
        "--out",
        &out,
    ]);
    assert_success(&run);
    (temp, out)
}

/// `perplexity` of `model` against `--compare-to reference`, on the first 64 tokens; returns
/// stdout, the top-1 agreement in percent and the mean KL in nats.
fn compare(model: &str, reference: &str) -> (String, f64, f64) {
    let out =
        phi3(&["perplexity", "--model", model, "--compare-to", reference, "--max-tokens", "64"]);
    assert_success(&out);
    let stdout = text(&out.stdout);
    let field = |prefix: &str, start: &str, end: char| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line: {stdout}"));
        let value = &line[line.find(start).unwrap() + start.len()..];
        let value = &value[..value.find(end).unwrap()];
        value.trim().parse().unwrap_or_else(|e| panic!("{e}: {value:?} in {line:?}"))
    };
    let agreement = field("top-1 agreement:", ":", '%');
    let kl = field("KL(", "mean ", ',');
    (stdout, agreement, kl)
}

#[test]
fn perplexity_compares_a_quantized_folder_to_its_original() {
    let (_temp, quantized) = quantized_fixture();
    let original = fixture("mha-f32-tied");
    let (stdout, agreement, kl) = compare(&quantized, &original);
    assert!(stdout.contains(&format!("reference: {original} (native weights)")), "{stdout}");
    assert!(agreement < 100.0, "{stdout}");
    assert!(kl > 0.0, "{stdout}");
    // The original is the reference: first row of the table, left of the KL.
    assert!(stdout.contains("KL(native ‖ int4-g32)"), "{stdout}");
}

#[test]
fn perplexity_of_a_folder_against_itself_agrees_fully() {
    let (_temp, quantized) = quantized_fixture();
    let (stdout, agreement, kl) = compare(&quantized, &quantized);
    assert!(stdout.contains(&format!("reference: {quantized} (int4-g32 weights)")), "{stdout}");
    assert_eq!(agreement, 100.0, "{stdout}");
    assert_eq!(kl, 0.0, "{stdout}");
}

#[test]
fn perplexity_compare_to_a_format_still_means_the_same_model() {
    let model = fixture("mha-f32-tied");
    let out = phi3(&[
        "perplexity",
        "--model",
        &model,
        "--weights",
        "int4-g32",
        "--compare-to",
        "int8",
        "--max-tokens",
        "16",
    ]);
    assert_success(&out);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("reference: the same model with int8 weights"), "{stdout}");
    assert!(stdout.contains("KL(int8 ‖ int4-g32)"), "{stdout}");
    // The examples show both forms.
    let help = text(&phi3(&["perplexity", "--help"]).stdout);
    assert!(help.contains("--compare-to int8") && help.contains("--compare-to ./"), "{help}");
}

#[test]
fn perplexity_compare_to_errors_are_one_line() {
    let model = fixture("mha-f32-tied");
    let run = |reference: &str| {
        assert_error(&phi3(&["perplexity", "--model", &model, "--compare-to", reference]), 1)
    };
    let missing = std::env::temp_dir().join("phi3-no-such-model/dir");
    let missing = missing.to_str().unwrap();
    let line = run(missing);
    assert!(line.contains(missing) && line.contains("--compare-to"), "{line}");
    // A bare word that is no format and no folder: most likely a mistyped format.
    let line = run("natve");
    assert!(line.contains("natve") && line.contains("int4-g32"), "{line}");
    // One that looks like a format is a usage error.
    let out = phi3(&["perplexity", "--model", &model, "--compare-to", "int4-g16"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("int4-g16"), "{}", text(&out.stderr));
    // Another vocabulary (384 tokens against 320).
    let line = run(&fixture("gqa-longrope-bf16"));
    assert!(line.contains("vocabular"), "{line}");
}

// ---- generate and chat on the demo model ----

#[test]
fn generate_streams_a_reply() {
    let out = phi3(&["generate", "--max-tokens", "8", "Hello"]);
    assert_success(&out);
    assert!(!text(&out.stdout).trim().is_empty(), "empty reply");
    assert!(text(&out.stderr).contains("built-in demo model"), "{}", text(&out.stderr));
}

#[test]
fn generate_is_deterministic_and_reports_stats() {
    let args = [
        "generate",
        "--max-tokens",
        "6",
        "--temperature",
        "0.8",
        "--seed",
        "7",
        "--stats",
        "Hello",
    ];
    let (a, b) = (phi3(&args), phi3(&args));
    assert_success(&a);
    assert_eq!(a.stdout, b.stdout);
    let stderr = text(&a.stderr);
    assert!(stderr.contains("[stats] prompt ") && stderr.contains("finish: "), "{stderr}");
}

#[test]
fn generate_raw_and_with_system_message() {
    let out = phi3(&["generate", "--raw", "--max-tokens", "4", "Hello"]);
    assert_success(&out);
    assert!(!text(&out.stdout).trim().is_empty());
    let out = phi3(&["generate", "--system", "Be brief.", "--max-tokens", "4", "Hi"]);
    assert_success(&out);
    let out = phi3_with_stdin(&["generate", "--max-tokens", "4", "-"], "prompt from stdin");
    assert_success(&out);
}

#[test]
fn chat_answers_each_line_of_piped_stdin() {
    let out = phi3_with_stdin(
        &["chat", "--max-tokens", "4", "--stats"],
        "Tell me about the history of the world in great detail please\nHi\n",
    );
    assert_success(&out);
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("> "), "no input prompt when stdin is not a terminal: {stderr}");
    let prompts: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("[stats] prompt "))
        .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(prompts.len(), 2, "two replies expected: {stderr}");
    // The second turn prefills only the new message: the first turn is in the KV cache.
    assert!(prompts[1] < prompts[0], "{prompts:?}");
    assert!(!text(&out.stdout).trim().is_empty());
}

#[test]
fn chat_commands_reset_and_exit() {
    let out = phi3_with_stdin(
        &["chat", "--max-tokens", "3", "--stats", "--system", "You are terse."],
        "one\n\n/reset\ntwo\n/exit\nthree\n",
    );
    assert_success(&out);
    assert_eq!(text(&out.stderr).matches("[stats]").count(), 2, "{}", text(&out.stderr));
}

/// Spawn `phi3 args...` with piped stdio and a watchdog that kills it after `limit`.
fn spawn(args: &[&str], limit: Duration) -> (Child, tempfile::TempDir) {
    let (mut cmd, cache) = command(args, None);
    let child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id().to_string();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    });
    (child, cache.unwrap())
}

/// Read `child`'s stdout until it has printed something, then drain the rest on a thread.
fn wait_for_output(child: &mut Child) {
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 256];
    assert!(stdout.read(&mut buf).unwrap() > 0, "no output");
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
}

fn interrupt(child: &Child) {
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_a_reply_and_chat_goes_on() {
    let (mut child, _cache) = spawn(
        &["chat", "--ignore-eos", "--max-tokens", "100000", "--max-context", "1024", "--stats"],
        Duration::from_secs(120),
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Tell me a long story\n").unwrap();
    stdin.flush().unwrap();
    wait_for_output(&mut child);
    interrupt(&child);
    // The next line is answered: the session survived the cancellation.
    stdin.write_all(b"/reset\nAnother one\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(stderr.contains("[generation stopped]"), "{stderr}");
    // Only the second reply ran to its end (the context is full long before --max-tokens).
    assert_eq!(stderr.matches("[stats]").count(), 1, "{stderr}");
}

#[cfg(unix)]
#[test]
fn a_second_ctrl_c_exits_with_130() {
    let (mut child, _cache) = spawn(
        &["chat", "--ignore-eos", "--max-tokens", "100000", "--max-context", "1024"],
        Duration::from_secs(120),
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Tell me a long story\n").unwrap();
    stdin.flush().unwrap();
    wait_for_output(&mut child);
    interrupt(&child);
    std::thread::sleep(Duration::from_millis(100));
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.code(), Some(130), "{:?}: {}", out.status, text(&out.stderr));
}
