//! `agent-connection-manager`: see `cli` for the commands.

fn main() -> std::process::ExitCode {
    agent_connection_manager::cli::main()
}
