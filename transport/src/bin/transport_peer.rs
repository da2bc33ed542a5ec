//! `transport-peer`: one mesh node on the command line, for checking a mesh by hand (between
//! two machines, say) and as the separate process the crate's tests kill and freeze.
//!
//! ```text
//! transport-peer --me 1 --listen 0.0.0.0:7001 --peer 0=10.0.0.1:7000 --secret S \
//!                [--layout TEXT | --layout-file PATH] [--connect-timeout-ms N] [--busy-poll]
//!                [--socket-buffer BYTES] [--echo] [--print-frames]
//! ```
//! Prints `ready` once the mesh is up, `lost <peer>: <why>` for each lost peer, and with
//! `--print-frames` one line per frame. With `--echo` it sends every frame back to its sender
//! on the same channel. It runs until its standard input closes, then shuts down and exits 0;
//! a failed setup prints the error and exits 1, bad arguments exit 2.

use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use transport::{
    Channel, FrameHandler, FrameRef, Liveness, MeshConfig, NodeId, TcpMesh, Transport,
};

struct Options {
    cfg: MeshConfig,
    echo: bool,
    print_frames: bool,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut me = None;
    let mut listen = None;
    let mut peers = Vec::new();
    let mut secret = None;
    let mut layout = String::from("transport-peer default layout\n");
    let mut connect_timeout = Duration::from_secs(30);
    let mut busy_poll = false;
    let mut socket_buffer = None;
    let mut echo = false;
    let mut print_frames = false;
    let mut args = args.peekable();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--me" => me = Some(value()?.parse().map_err(|e| format!("--me: {e}"))?),
            "--listen" => listen = Some(parse_addr("--listen", &value()?)?),
            "--peer" => {
                let spec = value()?;
                let (id, addr) = spec
                    .split_once('=')
                    .ok_or(format!("--peer {spec}: expected ID=ADDRESS"))?;
                let id: NodeId = id.parse().map_err(|e| format!("--peer {spec}: {e}"))?;
                peers.push((id, parse_addr("--peer", addr)?));
            }
            "--secret" => secret = Some(value()?.into_bytes()),
            "--layout" => layout = value()?,
            "--layout-file" => {
                let path = value()?;
                layout = std::fs::read_to_string(&path)
                    .map_err(|e| format!("--layout-file {path}: {e}"))?;
            }
            "--connect-timeout-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--connect-timeout-ms: {e}"))?;
                connect_timeout = Duration::from_millis(ms);
            }
            "--busy-poll" => busy_poll = true,
            "--socket-buffer" => {
                let bytes = value()?
                    .parse()
                    .map_err(|e| format!("--socket-buffer: {e}"))?;
                socket_buffer = Some(bytes);
            }
            "--echo" => echo = true,
            "--print-frames" => print_frames = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Options {
        cfg: MeshConfig {
            me: me.ok_or("--me is required")?,
            listen: listen.ok_or("--listen is required")?,
            peers,
            secret: secret.ok_or("--secret is required")?,
            layout_canonical: layout,
            connect_timeout,
            busy_poll,
            service_priority: transport::ServicePriority::default(),
            liveness: Liveness::default(),
            socket_buffer,
        },
        echo,
        print_frames,
    })
}

fn parse_addr(flag: &str, text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|e| format!("{flag} {text}: not a socket address: {e}"))
}

/// Prints what happens and, with `--echo`, answers.
struct Peer {
    mesh: OnceLock<Weak<TcpMesh>>,
    echo: bool,
    print_frames: bool,
}

impl FrameHandler for Peer {
    fn on_frame(&self, from: NodeId, channel: Channel, frame: FrameRef<'_>) {
        if self.print_frames {
            say(&format!(
                "frame from {from} on {channel}: kind {} flags {} id {} arg {} payload {} bytes",
                frame.kind,
                frame.flags,
                frame.id,
                frame.arg,
                frame.payload.len()
            ));
        }
        if self.echo {
            if let Some(mesh) = self.mesh.get().and_then(Weak::upgrade) {
                if let Err(e) = mesh.send_ref(from, channel, frame) {
                    eprintln!("echo to node {from} failed: {e}");
                }
            }
        }
    }

    fn on_peer_lost(&self, peer: NodeId, why: &str) {
        say(&format!("lost {peer}: {why}"));
    }
}

fn say(line: &str) {
    let mut out = io::stdout().lock();
    // Nobody reading our output is no reason to stop serving the mesh.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(problem) => {
            eprintln!("transport-peer: {problem}");
            return ExitCode::from(2);
        }
    };
    let peer = Arc::new(Peer {
        mesh: OnceLock::new(),
        echo: options.echo,
        print_frames: options.print_frames,
    });
    let mesh = match TcpMesh::establish(options.cfg, peer.clone()) {
        Ok(mesh) => mesh,
        Err(e) => {
            eprintln!("transport-peer: {e}");
            return ExitCode::from(1);
        }
    };
    let _ = peer.mesh.set(Arc::downgrade(&mesh));
    say("ready");
    // Run until standard input closes (the parent went away, or ^D by hand).
    for line in io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    mesh.shutdown();
    ExitCode::SUCCESS
}
