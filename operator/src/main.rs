//! `crashwatch-operator`: the command line. The controller itself is not built yet; `crds`
//! prints the API's CustomResourceDefinitions.

use clap::{Parser, Subcommand};

/// Turns repeated crashes and hangs on a node into safe, explainable remediation.
#[derive(Parser)]
#[command(name = "crashwatch-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watches CrashReports and RemediationPolicies and acts on them.
    Run,
    /// Prints the CustomResourceDefinitions (CrashReport, RemediationPolicy) as YAML.
    Crds,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run => anyhow::bail!("the remediation controller is not built yet"),
        Command::Crds => {
            print!("{}", crds::crd_yaml());
            Ok(())
        }
    }
}
