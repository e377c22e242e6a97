//! A user-space TCP proxy a test puts between a node agent and the gateway to partition
//! them: [`TcpProxy::blackhole`] stops all traffic without a FIN or RST (bytes sent
//! meanwhile wait in the kernels' buffers, as TCP would retransmit them), and
//! [`TcpProxy::heal`] lets it flow again. It runs on its own small runtime, owned by the
//! proxy and stopped with it.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub struct TcpProxy {
    pub address: SocketAddr,
    partitioned: watch::Sender<bool>,
    /// Owns the acceptor and every relayed connection; dropping the proxy ends them.
    _runtime: tokio::runtime::Runtime,
}

impl TcpProxy {
    /// Starts relaying connections on a free loopback port to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the proxy's runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the proxy");
        let address = listener.local_addr().expect("the proxy's address");
        let (partitioned, watching) = watch::channel(false);
        runtime.spawn(accept(listener, target, watching));
        Self {
            address,
            partitioned,
            _runtime: runtime,
        }
    }

    /// `http://<address>`, for an agent's `--gateway`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Nothing passes in either direction, and no connection is closed.
    pub fn blackhole(&self) {
        self.partitioned.send_replace(true);
    }

    /// Traffic flows again, including what was sent during the partition.
    pub fn heal(&self) {
        self.partitioned.send_replace(false);
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, partitioned: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        connections.spawn(relay(client, target, partitioned.clone()));
        while connections.try_join_next().is_some() {}
    }
}

async fn relay(client: TcpStream, target: SocketAddr, mut partitioned: watch::Receiver<bool>) {
    // A connection opened during the partition gets through once it heals (the client's
    // SYNs are retried), unless the client gives up first.
    if partitioned.wait_for(|cut| !cut).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, partitioned.clone()),
        pump(server_read, client_write, partitioned),
    );
}

/// Copies `from` to `to` while the link is up; during a partition reads nothing, so the
/// sender's data (and its FIN) waits for the heal. An end on one side is passed on.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut partitioned: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if partitioned.wait_for(|cut| !cut).await.is_err() {
            return;
        }
        // Reading is cancel-safe: a partition that starts mid-wait loses no byte.
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = partitioned.wait_for(|cut| *cut) => continue,
        };
        match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(read) => {
                if to.write_all(&buffer[..read]).await.is_err() {
                    return;
                }
            }
        }
    }
}
