//! A QMP server with a few demo commands, for trying clients by hand:
//!
//! ```text
//! cargo run -p qmp --example qmp_demo_server -- /tmp/demo.qmp [127.0.0.1:4444]
//! qmp-shell /tmp/demo.qmp          # from `pip install qemu.qmp`
//! (QEMU) x-add a=40 b=2
//! (QEMU) x-emit event=HELLO
//! (QEMU) quit
//! ```

use std::net::SocketAddr;

use qmp::{QmpError, Registry, Server, ServerConfig};
use serde_json::{json, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: qmp_demo_server SOCKET_PATH [TCP_ADDR]")?;
    let mut config = ServerConfig::unix(path);
    if let Some(tcp) = args.next() {
        config = config.with_tcp(tcp.parse::<SocketAddr>()?);
    }

    let mut reg = Registry::new();
    reg.define("{'enum': 'DemoColour', 'data': ['red', 'green']}")?;
    reg.register("x-add", "{'a': 'int', 'b': 'int'}", |a| {
        let (x, y) = (a.i64("a")?, a.i64("b")?);
        x.checked_add(y)
            .map(|s| json!(s))
            .ok_or_else(|| QmpError::generic("integer overflow"))
    })?;
    reg.register(
        "x-paint",
        "{'colour': 'DemoColour', '*times': 'uint8'}",
        |a| Ok(json!({"painted": a.str("colour")?, "times": a.opt_u64("times").unwrap_or(1)})),
    )?;
    let events = reg.events();
    reg.register("x-emit", "{'event': 'str', '*data': 'any'}", move |a| {
        events.emit(
            a.str("event")?,
            a.get("data").cloned().unwrap_or(Value::Null),
        );
        Ok(json!({}))
    })?;

    let server = Server::start(reg, config)?;
    eprintln!(
        "QMP demo server on {:?}{}",
        server.unix_path(),
        server
            .tcp_addr()
            .map(|a| format!(" and {a}"))
            .unwrap_or_default()
    );
    let reason = server.wait();
    eprintln!("stopping: {reason:?}");
    server.join();
    Ok(())
}
