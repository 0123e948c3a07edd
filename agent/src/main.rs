//! `tapwire`: parse the command line, set up logging, hand over to [`tapwire::app`].

fn main() -> std::process::ExitCode {
    tapwire::app::main()
}
