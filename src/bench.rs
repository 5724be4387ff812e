//! `crier bench` load tool (placeholder).
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
