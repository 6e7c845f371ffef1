fn main() -> std::process::ExitCode {
    nixpush::main()
}
