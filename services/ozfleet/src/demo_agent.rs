//! A stand-in for the `oz` CLI, for demos and tests. `ozfleet` becomes this program when
//! started under the name `oz-demo-agent` (a symlink, busybox style), so the demo needs no
//! second binary. Invoked as `oz agent run …` by a backend, it fetches its run from the server the way oz does (`--server-root-url`,
//! `--task-id`, the task's `WARP_API_KEY`), prints its argv, environment names and prompt,
//! and then does what the prompt says:
//!
//! - `sleep N` (or `N seconds`): wait N seconds in a child process (so cancellation has a
//!   grandchild to clean up);
//! - `fail`: exit 1, or `exit N` for exit status N.

use std::process::ExitCode;
use std::time::Duration;

use ozfleet_control_plane::client::RunClient;

/// Name under which `ozfleet` acts as the demo agent.
pub const PROGRAM_NAME: &str = "oz-demo-agent";

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("oz-demo-agent: argv: {}", args.join(" "));
    let mut names: Vec<String> = std::env::vars_os()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .collect();
    names.sort();
    println!("oz-demo-agent: env names: {}", names.join(", "));

    let (Some(task_id), Some(server_root_url)) = (
        flag_value(&args, "--task-id"),
        flag_value(&args, "--server-root-url"),
    ) else {
        eprintln!("oz-demo-agent: expected `agent run --task-id ID --server-root-url URL …`");
        return ExitCode::from(2);
    };
    let prompt = match fetch_prompt(&server_root_url, &task_id) {
        Ok(prompt) => prompt,
        Err(error) => {
            eprintln!("oz-demo-agent: cannot fetch run {task_id}: {error}");
            return ExitCode::from(2);
        }
    };
    println!("oz-demo-agent: prompt: {prompt}");

    let words: Vec<String> = prompt
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    if let Some(seconds) = number_near(&words, "sleep").or_else(|| number_before(&words, "seconds"))
    {
        println!("oz-demo-agent: sleeping {seconds} s");
        let status = std::process::Command::new("sleep")
            .arg(seconds.to_string())
            .status();
        if let Err(error) = status {
            eprintln!("oz-demo-agent: cannot run sleep: {error}");
            std::thread::sleep(Duration::from_secs(seconds));
        }
    }
    if let Some(code) = number_near(&words, "exit") {
        println!("oz-demo-agent: exiting with status {code} as asked");
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    if words.iter().any(|word| word == "fail") {
        println!("oz-demo-agent: failing as asked");
        return ExitCode::FAILURE;
    }
    println!("oz-demo-agent: hello from run {task_id}; done");
    ExitCode::SUCCESS
}

fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|arg| arg == flag)
        .and_then(|index| args.get(index + 1))
        .cloned()
}

/// The number right after `keyword` (allowing one filler word: "exit with 3", "exit code 3").
fn number_near(words: &[String], keyword: &str) -> Option<u64> {
    let index = words.iter().position(|word| word == keyword)?;
    words[index + 1..]
        .iter()
        .take(2)
        .find_map(|word| word.parse().ok())
}

fn number_before(words: &[String], keyword: &str) -> Option<u64> {
    let index = words.iter().position(|word| word == keyword)?;
    words.get(index.checked_sub(1)?)?.parse().ok()
}

/// Fetches the run with the task's own run token, as the `oz` CLI does; that first call is
/// also how the control plane learns that the run is in progress.
fn fetch_prompt(server_root_url: &str, task_id: &str) -> Result<String, String> {
    let api_key =
        std::env::var("WARP_API_KEY").map_err(|_| "WARP_API_KEY is not set".to_string())?;
    let client = RunClient::new(server_root_url, api_key.into());
    let run = client.get(task_id).map_err(|error| {
        // The chain says why (connection refused, the server's message, …).
        format!("{:#}", anyhow::Error::from(error))
    })?;
    Ok(run.prompt)
}
