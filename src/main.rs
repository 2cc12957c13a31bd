//! The `kanaria` binary: command-line parsing and wiring only.

// `Instant::now` and `SystemTime::now` are refused here too (clippy.toml).
#![deny(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: Pingora allocates per request (headers, buffers,
/// tasks), and under load glibc's malloc and free took about 12% of the proxy's CPU
/// (measurements in bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_CONFIG: &str = "config/kanaria.toml";

#[derive(Parser)]
#[command(
    name = "kanaria",
    version,
    about = "A canary-release reverse proxy on Pingora"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Take over the listeners of a running kanaria (graceful binary upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file: exit 0, or print every error and exit 1.
    Check {
        #[arg(default_value = DEFAULT_CONFIG)]
        file: PathBuf,
    },
    /// A whole canary story: demo apps, simulated users, a rollout, a failure, a rollback.
    Demo {
        #[arg(short, long, default_value = "config/demo.toml")]
        config: PathBuf,
        /// Proxy listen address (default: the config's).
        #[arg(long)]
        listen: Option<String>,
        /// Admin and dashboard address (default: the config's).
        #[arg(long)]
        admin: Option<String>,
        /// Exit when the story ends: 0 if it ended in a rollback, 1 otherwise.
        #[arg(long)]
        exit_after_scenario: bool,
    },
    /// Show routes, weights, rollout states and endpoint health of a running Kanaria.
    Status {
        #[arg(long, env = "KANARIA_ADMIN_ADDR", default_value = DEFAULT_ADMIN)]
        admin: String,
    },
    /// Set a route's canary weight in percent (token from KANARIA_ADMIN_TOKEN).
    Weight {
        route: String,
        percent: f64,
        #[arg(long, env = "KANARIA_ADMIN_ADDR", default_value = DEFAULT_ADMIN)]
        admin: String,
    },
    /// Move every user of a route back to stable (token from KANARIA_ADMIN_TOKEN).
    Rollback {
        route: String,
        #[arg(long, env = "KANARIA_ADMIN_ADDR", default_value = DEFAULT_ADMIN)]
        admin: String,
    },
    /// Print a signed override token for QA (secret from the route's override_secret in
    /// the config, else KANARIA_OVERRIDE_SECRET).
    SignOverride {
        /// `canary`, `stable` or a pool's version label.
        #[arg(long)]
        version: String,
        /// How long the token is valid, e.g. `1h`, `30m`.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The route the token is for (tokens are bound to one route).
        #[arg(long)]
        route: String,
        /// Read the secret from this config file's route.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Next rollout step, or every user to the canary (token from KANARIA_ADMIN_TOKEN).
    Promote {
        route: String,
        #[arg(long, env = "KANARIA_ADMIN_ADDR", default_value = DEFAULT_ADMIN)]
        admin: String,
        /// Also end the long-lived streams (WebSocket, SSE, gRPC) of the stable users the
        /// promotion moves to the canary, within the route's rollback_drain.
        #[arg(long)]
        drain: bool,
    },
    /// Hold a progressing rollout at its step (token from KANARIA_ADMIN_TOKEN).
    Pause {
        route: String,
        #[arg(long, env = "KANARIA_ADMIN_ADDR", default_value = DEFAULT_ADMIN)]
        admin: String,
    },
    /// Continue a paused rollout, or restart a rolled-back one (token from KANARIA_ADMIN_TOKEN).
    Resume {
        route: String,
        #[arg(long, env = "KANARIA_ADMIN_ADDR", default_value = DEFAULT_ADMIN)]
        admin: String,
    },
}

const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

fn report(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(out) => {
            println!("{}", out.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// mimalloc asks for transparent huge pages on its heap (`MADV_HUGEPAGE`), so each 2 MiB
/// region it touches becomes resident whole: a proxy with one route held 14 MiB of huge
/// pages for ~3 MiB of data, and 1,000 routes ~40 MiB more than their data
/// (bench/README.md, "Memory per route"). Kanaria's heap is small and its hot data (a few
/// connections' buffers, the route table) does without them, so the process opts out and
/// the kernel backs the heap with 4 KiB pages. It runs as an initializer, before `main` and
/// before mimalloc's first allocation: huge pages faulted in by then would stay.
#[cfg(target_os = "linux")]
extern "C" fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches none of our memory; a
    // failure (an old kernel) leaves the default, which is only a cost in memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Initializers with a priority run before those without (mimalloc's and the Rust
/// runtime's), lowest first; 101 is the first one not reserved for the C library.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00101"]
static NO_TRANSPARENT_HUGE_PAGES: extern "C" fn() = no_transparent_huge_pages;

/// Blocks above 4 MiB straight from the system (`mmap`) and back to it when freed, instead of
/// from mimalloc's arenas, whose freed pages go back only 1 s later (`purge_delay`) and only
/// when a later allocation gets round to it: the text of a `/metrics` scrape (5.5 MB with
/// 1,000 routes) stayed resident after the answer was sent. Nothing on the request path is
/// that large (mimalloc's largest pages of small blocks are 4 MiB, and stay in the arenas),
/// so requests pay nothing for it; purging everything at once (`purge_delay = 0`) did the
/// same for the scrape but cost 4% more system calls and ~20% more CPU time per request
/// (bench/README.md, "1,000 routes under 64 MiB again"). `MIMALLOC_ARENA_MAX_OBJECT_SIZE`
/// in the environment (with its unit, e.g. `4MiB`: a bare number is bytes) still decides.
fn large_blocks_from_the_system() {
    /// `mi_option_arena_max_object_size` in mimalloc 3's `mi_option_t` (the Rust binding
    /// names only some of the options); in KiB.
    const MI_OPTION_ARENA_MAX_OBJECT_SIZE: libmimalloc_sys::mi_option_t = 45;
    if std::env::var_os("MIMALLOC_ARENA_MAX_OBJECT_SIZE").is_none() {
        // SAFETY: sets one of mimalloc's option values (a plain integer it reads when it
        // places a large block); no memory of ours is touched.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_MAX_OBJECT_SIZE, 4096) };
    }
}

fn main() -> ExitCode {
    large_blocks_from_the_system();
    let cli = Cli::parse();
    // The demo tells its story on the terminal: Pingora's INFO lines would interleave with
    // it, so it logs warnings and errors only unless RUST_LOG says otherwise.
    let default_filter = match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .init();
    match cli.command {
        Command::Run { config, upgrade } => match kanaria::server::run(&config, upgrade) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check { file } => match kanaria::server::check(&file) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Demo {
            config,
            listen,
            admin,
            exit_after_scenario,
        } => report(
            kanaria::demo::run(kanaria::demo::DemoOptions {
                config,
                listen,
                admin,
                exit_after_scenario,
            })
            .map(|()| String::new()),
        ),
        Command::Status { admin } => report(kanaria::admin::cli::status(&admin)),
        Command::Weight {
            route,
            percent,
            admin,
        } => report(kanaria::admin::cli::act(
            &admin,
            &route,
            "weight",
            Some(&format!("{{\"percent\": {percent}}}")),
        )),
        Command::Rollback { route, admin } => {
            report(kanaria::admin::cli::act(&admin, &route, "rollback", None))
        }
        Command::SignOverride {
            version,
            ttl,
            route,
            config,
        } => report(kanaria::split::override_token::sign_command(
            &version,
            &ttl,
            &route,
            config.as_deref(),
        )),
        Command::Promote {
            route,
            admin,
            drain,
        } => {
            let body = drain.then_some(r#"{"drain": true}"#);
            report(kanaria::admin::cli::act(&admin, &route, "promote", body))
        }
        Command::Pause { route, admin } => {
            report(kanaria::admin::cli::act(&admin, &route, "pause", None))
        }
        Command::Resume { route, admin } => {
            report(kanaria::admin::cli::act(&admin, &route, "resume", None))
        }
    }
}
