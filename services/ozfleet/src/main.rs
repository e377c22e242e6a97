fn main() -> std::process::ExitCode {
    ozfleet::main()
}
