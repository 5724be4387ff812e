use clap::{Args, CommandFactory, FromArgMatches};

/// `crier bench` joins the library's commands here, in the binary, so the server library
/// never depends on the load tool (`crier-bench`).
/// jemalloc returns freed memory to the system (background threads purge it after its
/// decay time), so an attack's peak does not stay with the node for good as it did with
/// glibc malloc (issue 15; docs/BENCHMARKS.md, "Memory after an attack").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const BENCH_ABOUT: &str =
    "Load-test a running server (loopback only): subscribers, publications, latency";

fn main() -> std::process::ExitCode {
    let command = crier::cli::Cli::command().subcommand(crier_bench::BenchArgs::augment_args(
        clap::Command::new("bench").about(BENCH_ABOUT),
    ));
    let matches = command.get_matches();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = match matches.subcommand() {
        Some(("bench", m)) => {
            crier::logging::init(crier::logging::LogFormat::Text);
            crier_bench::BenchArgs::from_arg_matches(m)
                .map_err(anyhow::Error::from)
                .map(|args| runtime.block_on(crier_bench::run(args)))
        }
        // The server's commands install logging once their settings say in which format.
        _ => crier::cli::Cli::from_arg_matches(&matches)
            .map_err(anyhow::Error::from)
            .map(|cli| runtime.block_on(crier::cli::run(cli))),
    };
    match result.and_then(|r| r) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crier: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
