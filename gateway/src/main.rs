//! The `breakwater` command.

fn main() -> std::process::ExitCode {
    breakwater::cli::main()
}
