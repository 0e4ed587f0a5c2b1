//! The blocking wrapper, for programs without an async runtime.
//!
//! ```text
//! cargo run -p cove-client --example blocking -- uname -a
//! ```

use cove_client::Error;
use cove_client::blocking::Client;

fn main() -> Result<(), Error> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (program, args) = match argv.split_first() {
        Some((program, args)) => (program.clone(), args.to_vec()),
        None => ("uname".to_string(), vec!["-a".to_string()]),
    };
    let client = Client::from_env()?;
    let sandbox = client.create(Default::default())?;
    let out = sandbox.output(sandbox.command(program).args(args))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let code = out.status.exit_code();
    sandbox.kill()?;
    std::process::exit(code);
}
