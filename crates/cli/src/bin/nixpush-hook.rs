fn main() -> std::process::ExitCode {
    nixpush::hook::main()
}
