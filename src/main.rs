fn main() {
    std::process::exit(snaptree::cli::run());
}
