//! The daemon side: owns the pool, serves active thins over FUSE + loop, answers clients.
//!
//! Threads: one accepts connections, one per connection runs its requests one at a time
//! (each takes the state lock, so requests from all clients are serialised: the pool
//! messages are quick, and bulk IO belongs on the block devices), the FUSE workers serve the
//! active thins' IO without that lock, and a reaper finishes deferred deactivations once the
//! kernel has let go of their loop devices. At most [`MAX_CLIENTS`] connections are served
//! at once; a shutdown closes those still open.
//!
//! A stop is decided under the state lock, and the same critical section marks the daemon
//! stopping: nothing is accepted between the check that nothing is in use and the shutdown.
//!
//! Stale state from a daemon that was killed (a dead FUSE mount, loop devices still pointing
//! into it, a socket file) is cleaned up by the next start, after it has taken the pool's
//! ownership lock, so it never disturbs a live daemon.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::protocol::{receive, send, Reply, Request, MAX_PAYLOAD};
use super::RunDir;
use crate::activate::control::{Activation, Local, PoolControl};
use crate::activate::fuse::{ExportOptions, FuseExport};
use crate::activate::loopdev::{self, LoopDevice, LoopOptions};
use crate::activate::nbd::{self, Listen, NbdListener};
use crate::error::{Error, Result};
use crate::store::Volumes;
use crate::thin::files::PoolPaths;
use crate::thin::pool::PoolOptions;
use crate::units::ThinId;

/// How to start a daemon.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub paths: PoolPaths,
    pub store_path: PathBuf,
    pub run_dir: RunDir,
    pub options: PoolOptions,
    /// FUSE worker threads serving the active thins.
    pub fuse_workers: usize,
}

/// Client connections served at once; more are refused. Each has a thread and, while a
/// request comes in, buffers of up to a message line and a payload (16 MiB each), so
/// without a cap idle connections could use up the daemon's threads or memory. A command
/// holds one connection while it runs (and `serve --nbd` one while it serves): 128 is far
/// above what dmtool and the runtime use at once.
const MAX_CLIENTS: usize = 128;

/// A running daemon.
pub struct Daemon {
    run_dir: RunDir,
    state: Mutex<State>,
    fuse: Mutex<Option<FuseExport>>,
    stop: Mutex<bool>,
    stop_changed: Condvar,
    clients: Mutex<Clients>,
    /// Set by [`Daemon::shutdown`] (under the `clients` lock): no connection is admitted
    /// from then on, and the accept thread ends at its next wake-up.
    closed: AtomicBool,
}

/// The connections being served, each under a number of its own, so that the accept thread
/// can count them and a shutdown can end them (an idle client's thread waits in a read).
#[derive(Default)]
struct Clients {
    next: u64,
    streams: HashMap<u64, UnixStream>,
}

struct State {
    local: Local,
    active: BTreeMap<ThinId, Active>,
    /// Where each NBD server that a client connection keeps running listens (one entry
    /// per server): a stop without force must not cut their clients off.
    nbd_servers: Vec<String>,
    stopping: bool,
}

struct Active {
    device: LoopDevice,
    file: PathBuf,
    read_only: bool,
    deferred: bool,
}

impl Active {
    fn describe(&self, id: ThinId) -> Activation {
        Activation {
            id: id.get(),
            device: self.device.path(),
            file: Some(self.file.clone()),
            read_only: self.read_only,
            deferred_removal: self.deferred,
        }
    }
}

/// `Busy` when thin `id` is active: `what` (delete, write to...) must wait until it is not.
fn refuse_if_active(state: &State, id: ThinId, what: &str) -> Result<()> {
    match state.active.get(&id) {
        Some(active) => Err(Error::Busy {
            what: format!("thin {id}"),
            holder: format!(
                "it is active as {}; deactivate it first to {what} it",
                active.device.path().display()
            ),
        }),
        None => Ok(()),
    }
}

fn activation_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Activation(format!("{what}: {e}"))
}

impl Daemon {
    /// Takes ownership of the pool, cleans up after a daemon that died, mounts the FUSE
    /// export and listens on the socket.
    pub fn start(config: DaemonConfig) -> Result<Arc<Daemon>> {
        // Resolved: stale FUSE mounts and loop devices are found by the paths the kernel
        // reports, which never go through a symlink.
        let run = &config.run_dir.prepare()?;
        // The lock first: a live daemon's state must never be mistaken for stale.
        let volumes = Volumes::open(&config.paths, &config.store_path, config.options)?;
        clean_stale(run)?;
        let mountpoint = run.fuse_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&mountpoint)
            .map_err(|e| {
                activation_error(format_args!("failed to create {}", mountpoint.display()), e)
            })?;
        let fuse = FuseExport::mount(
            &mountpoint,
            ExportOptions {
                workers: config.fuse_workers,
            },
        )?;
        let daemon = Arc::new(Daemon::new(run.clone(), volumes, Some(fuse)));
        daemon.listen()?;
        let _ = fs::write(run.pid_file(), format!("{}\n", std::process::id()));
        {
            let daemon = Arc::downgrade(&daemon);
            thread::Builder::new()
                .name("daemon-reaper".into())
                .spawn(move || {
                    while let Some(daemon) = daemon.upgrade() {
                        daemon.reap_deferred();
                        drop(daemon);
                        thread::sleep(Duration::from_millis(200));
                    }
                })
                .map_err(|e| activation_error("failed to start the reaper thread", e))?;
        }
        tracing::info!(socket = %run.socket().display(), "pool daemon listening");
        Ok(daemon)
    }

    fn new(run_dir: RunDir, volumes: Volumes, fuse: Option<FuseExport>) -> Daemon {
        Daemon {
            run_dir,
            state: Mutex::new(State {
                local: Local::new(volumes),
                active: BTreeMap::new(),
                nbd_servers: Vec::new(),
                stopping: false,
            }),
            fuse: Mutex::new(fuse),
            stop: Mutex::new(false),
            stop_changed: Condvar::new(),
            clients: Mutex::new(Clients::default()),
            closed: AtomicBool::new(false),
        }
    }

    /// Listens on the run directory's socket, from an accept thread of its own.
    fn listen(self: &Arc<Self>) -> Result<()> {
        let socket = self.run_dir.socket();
        let listener = UnixListener::bind(&socket).map_err(|e| {
            activation_error(format_args!("failed to listen on {}", socket.display()), e)
        })?;
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).map_err(|e| {
            activation_error(format_args!("failed to protect {}", socket.display()), e)
        })?;
        let daemon = self.clone();
        thread::Builder::new()
            .name("daemon-accept".into())
            .spawn(move || daemon.accept(listener))
            .map_err(|e| activation_error("failed to start the accept thread", e))?;
        Ok(())
    }

    /// Blocks until a client asks the daemon to stop or [`Daemon::request_stop`] is called.
    pub fn wait_for_stop(&self) {
        let mut stop = self.stop.lock();
        while !*stop {
            self.stop_changed.wait(&mut stop);
        }
    }

    /// Makes [`Daemon::wait_for_stop`] return (a signal handler's job).
    pub fn request_stop(&self) {
        *self.stop.lock() = true;
        self.stop_changed.notify_all();
    }

    /// Deactivates every thin, commits, unmounts the export, closes the connections still
    /// open (NBD servers they keep end with them) and removes the socket. Thins still in use
    /// are detached when their users close them; their filesystems see IO errors from now
    /// on, which is logged.
    pub fn shutdown(&self) -> Result<()> {
        let mut state = self.state.lock();
        state.stopping = true;
        let ids: Vec<ThinId> = state.active.keys().copied().collect();
        for id in ids {
            let active = &state.active[&id];
            let users = active.device.users();
            if users.is_empty() {
                if let Err(e) = self.finish_deactivate(&mut state, id, false) {
                    tracing::warn!(thin_id = %id, "deactivation at shutdown failed: {e}");
                }
            } else {
                tracing::warn!(
                    thin_id = %id,
                    device = %active.device.path().display(),
                    "still in use at shutdown ({}); it detaches when they close it and sees IO \
                     errors until then",
                    users.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                );
                let _ = active.device.detach_deferred();
            }
        }
        let committed = state.local.flush();
        if let Some(fuse) = self.fuse.lock().take() {
            if let Err(e) = fuse.unmount() {
                tracing::warn!("unmounting the FUSE export: {e}");
            }
        }
        drop(state);
        // A shutdown waits for no client: every connection still open ends here, idle ones
        // included, so their threads finish and their clients see the end of the stream
        // instead of waiting on a daemon that is gone (an NBD server a connection keeps
        // ends with it). Their requests have been refused since `stopping` was set.
        {
            // Under the lock `admit` takes, so no connection is let in after this.
            let clients = self.clients.lock();
            self.closed.store(true, Ordering::Release);
            for stream in clients.streams.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        // Wakes the accept thread so that it sees `closed`.
        let _ = UnixStream::connect(self.run_dir.socket());
        let _ = fs::remove_file(self.run_dir.socket());
        let _ = fs::remove_file(self.run_dir.pid_file());
        committed
    }

    fn accept(self: Arc<Self>, listener: UnixListener) {
        for stream in listener.incoming() {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            match stream {
                Ok(stream) => {
                    if !crate::activate::peer_is_trusted(&stream) {
                        tracing::warn!("refused a client of another user");
                        continue;
                    }
                    let Some(admitted) = self.admit(&stream) else {
                        if self.closed.load(Ordering::Acquire) {
                            return;
                        }
                        refuse_client(stream);
                        continue;
                    };
                    let spawned =
                        thread::Builder::new()
                            .name("daemon-client".into())
                            .spawn(move || {
                                admitted.daemon.serve_client(stream);
                                drop(admitted);
                            });
                    if let Err(e) = spawned {
                        tracing::warn!("failed to start a client thread: {e}");
                    }
                }
                Err(e) => {
                    tracing::warn!("accept on the daemon socket: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Counts a new connection in; `None` when [`MAX_CLIENTS`] are served already, or the
    /// daemon has shut down.
    fn admit(self: &Arc<Self>, stream: &UnixStream) -> Option<Admitted> {
        let mut clients = self.clients.lock();
        if self.closed.load(Ordering::Acquire) || clients.streams.len() >= MAX_CLIENTS {
            return None;
        }
        // Without a handle of its own on the socket a shutdown could not end this
        // connection: refused like one too many.
        let handle = match stream.try_clone() {
            Ok(handle) => handle,
            Err(e) => {
                tracing::warn!("failed to keep a client connection: {e}");
                return None;
            }
        };
        let number = clients.next;
        clients.next += 1;
        clients.streams.insert(number, handle);
        Some(Admitted {
            daemon: self.clone(),
            number,
        })
    }

    fn serve_client(&self, stream: UnixStream) {
        // NBD servers started by this client live as long as its connection.
        let mut nbd_listeners: Vec<NbdListener> = Vec::new();
        self.serve_requests(stream, &mut nbd_listeners);
        if !nbd_listeners.is_empty() {
            let mut state = self.state.lock();
            for listener in &nbd_listeners {
                let listen = listener.listen().to_string();
                if let Some(at) = state.nbd_servers.iter().position(|l| *l == listen) {
                    state.nbd_servers.remove(at);
                }
            }
        }
    }

    fn serve_requests(&self, stream: UnixStream, nbd_listeners: &mut Vec<NbdListener>) {
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            let request: Request = match receive(&mut reader) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!("dropping a client: {e}");
                    let _ = send(
                        &mut writer,
                        &Reply::failed(&Error::InvalidArgument(e.to_string())),
                    );
                    return;
                }
            };
            let payload_len = match &request {
                Request::Write { length, .. } | Request::Read { length, .. } => *length,
                _ => 0,
            };
            if payload_len > MAX_PAYLOAD {
                let e = Error::InvalidArgument(format!(
                    "{payload_len} bytes in one request; the limit is {MAX_PAYLOAD}"
                ));
                let _ = send(&mut writer, &Reply::failed(&e));
                return;
            }
            buf.resize(payload_len as usize, 0);
            if matches!(request, Request::Write { .. }) && reader.read_exact(&mut buf).is_err() {
                return;
            }
            let handled = match &request {
                Request::ServeNbd {
                    listen,
                    ids,
                    read_only,
                } => self
                    .serve_nbd(listen, ids, *read_only)
                    .map(|(listener, names)| {
                        nbd_listeners.push(listener);
                        Reply {
                            exports: Some(names),
                            ..Reply::ok()
                        }
                    }),
                _ => self.handle(&request, &mut buf),
            };
            let reply = handled.unwrap_or_else(|e| Reply::failed(&e));
            let sent = send(&mut writer, &reply).and_then(|()| {
                if reply.ok && matches!(request, Request::Read { .. }) {
                    writer.write_all(&buf)
                } else {
                    Ok(())
                }
            });
            // A granted stop left the daemon refusing everything (`stopping`): it stops
            // whether or not the reply reached the client.
            if reply.ok && matches!(request, Request::Stop { .. }) {
                self.request_stop();
                return;
            }
            if sent.is_err() {
                return;
            }
        }
    }

    fn handle(&self, request: &Request, buf: &mut [u8]) -> Result<Reply> {
        if let Some(reply) = self.thin_io(request, buf)? {
            return Ok(reply);
        }
        let mut state = self.state.lock();
        if state.stopping {
            return Err(Error::Activation("the pool daemon is stopping".into()));
        }
        let thin_id = |id: u64| ThinId::new(id).ok_or(Error::BadThinId(id));
        let mut reply = Reply::ok();
        match request {
            Request::Status => {
                let mut status = state.local.status()?;
                status.daemon_pid = Some(std::process::id());
                reply.status = Some(status);
            }
            Request::List => {
                let mut thins = state.local.list()?;
                for t in &mut thins {
                    if let Some(id) = ThinId::new(t.id) {
                        t.active = state.active.get(&id).map(|a| a.describe(id));
                    }
                }
                reply.thins = Some(thins);
            }
            Request::CreateThin {
                id,
                size_bytes,
                name,
            } => state
                .local
                .create_thin(thin_id(*id)?, *size_bytes, name.as_deref())?,
            Request::CreateSnap { id, origin, name } => {
                state
                    .local
                    .create_snap(thin_id(*id)?, thin_id(*origin)?, name.as_deref())?
            }
            Request::Delete { id } => {
                let id = thin_id(*id)?;
                refuse_if_active(&state, id, "delete")?;
                state.local.delete(id)?;
            }
            Request::Rename { id, name } => state.local.rename(thin_id(*id)?, name.as_deref())?,
            Request::SetTransactionId { old, new } => state.local.set_transaction_id(*old, *new)?,
            Request::ReserveMetadataSnap => state.local.reserve_metadata_snap()?,
            Request::ReleaseMetadataSnap => state.local.release_metadata_snap()?,
            Request::ResizePool {
                data_bytes,
                metadata_bytes,
            } => state.local.resize_pool(*data_bytes, *metadata_bytes)?,
            Request::SizeOf { id } => reply.size_bytes = Some(state.local.size_of(thin_id(*id)?)?),
            Request::Read { .. } | Request::Write { .. } | Request::Discard { .. } => {
                return Err(Error::InvalidArgument(
                    "thin IO is served without the state lock".into(),
                ))
            }
            Request::Flush => state.local.flush()?,
            Request::Activate { id, read_only } => {
                reply.activation = Some(self.activate(&mut state, thin_id(*id)?, *read_only)?)
            }
            Request::Deactivate { id, deferred } => {
                self.deactivate(&mut state, thin_id(*id)?, *deferred)?
            }
            Request::ServeNbd { .. } => {
                return Err(Error::InvalidArgument(
                    "serve_nbd is handled per connection".into(),
                ))
            }
            Request::Stop { force } => {
                if !force {
                    let mut busy: Vec<String> = state
                        .active
                        .iter()
                        .filter_map(|(id, a)| {
                            let users = a.device.users();
                            (!users.is_empty()).then(|| {
                                format!(
                                    "thin {id} on {} ({})",
                                    a.device.path().display(),
                                    users
                                        .iter()
                                        .map(ToString::to_string)
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                )
                            })
                        })
                        .collect();
                    if !state.nbd_servers.is_empty() {
                        busy.push(format!("NBD server on {}", state.nbd_servers.join(", ")));
                    }
                    if !busy.is_empty() {
                        return Err(Error::Busy {
                            what: "the pool daemon".into(),
                            holder: format!("{} in use: {}", busy.len(), busy.join("; ")),
                        });
                    }
                }
                // Decided: from here on every request is refused, as the lock is let go
                // before the shutdown begins (an activation or NBD server let in between
                // would be cut off by it).
                state.stopping = true;
            }
        }
        Ok(reply)
    }

    /// Serves a read, write or discard (`None` for any other request) without holding the
    /// state lock during the IO: with `--when-full queue` a write waits for space, up to the
    /// queue timeout, and the resize that would give it space needs that lock.
    fn thin_io(&self, request: &Request, buf: &mut [u8]) -> Result<Option<Reply>> {
        let (id, offset, length, writes) = match *request {
            Request::Read { id, offset, .. } => (id, offset, buf.len() as u64, None),
            Request::Write { id, offset, .. } => (id, offset, buf.len() as u64, Some("write to")),
            Request::Discard { id, offset, length } => (id, offset, length, Some("discard in")),
            _ => return Ok(None),
        };
        let id = ThinId::new(id).ok_or(Error::BadThinId(id))?;
        let thin = {
            let mut state = self.state.lock();
            if state.stopping {
                return Err(Error::Activation("the pool daemon is stopping".into()));
            }
            // Changes beside an active device would go under its user's feet (a mounted
            // file system's cache, a read-only activation's promise).
            if let Some(what) = writes {
                refuse_if_active(&state, id, what)?;
            }
            state.local.io_handle(id, offset, length)?
        };
        let mut reply = Reply::ok();
        match request {
            Request::Read { .. } => {
                thin.read(buf, offset)?;
                reply.length = Some(length);
            }
            Request::Write { .. } => thin.write(buf, offset)?,
            _ => thin.discard(offset, length)?,
        }
        Ok(Some(reply))
    }

    fn serve_nbd(
        &self,
        listen: &Listen,
        ids: &[u64],
        read_only: bool,
    ) -> Result<(NbdListener, String)> {
        let mut state = self.state.lock();
        if state.stopping {
            return Err(Error::Activation("the pool daemon is stopping".into()));
        }
        let ids = ids
            .iter()
            .map(|&id| ThinId::new(id).ok_or(Error::BadThinId(id)))
            .collect::<Result<Vec<_>>>()?;
        let volumes = state.local.volumes();
        let exports = nbd::exports_for(volumes, &ids, read_only)?;
        let names = nbd::describe(&exports);
        let server = Arc::new(nbd::Server::new(volumes.pool().clone(), exports));
        let listener = NbdListener::start(server, listen)?;
        state.nbd_servers.push(listen.to_string());
        tracing::info!(%listen, exports = %names, "serving over NBD");
        Ok((listener, names))
    }

    fn activate(&self, state: &mut State, id: ThinId, read_only: bool) -> Result<Activation> {
        if let Some(active) = state.active.get(&id) {
            if active.read_only != read_only {
                return Err(Error::InvalidArgument(format!(
                    "thin {id} is already active {} as {}",
                    if active.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    },
                    active.device.path().display()
                )));
            }
            if active.deferred {
                return Err(Error::Busy {
                    what: format!("thin {id}"),
                    holder: format!(
                        "its device {} waits for its last user to close it (deferred removal)",
                        active.device.path().display()
                    ),
                });
            }
            return Ok(active.describe(id));
        }
        let size = state.local.size_of(id)?;
        let thin = state.local.open_thin(id)?;
        let fuse = self.fuse.lock();
        let fuse = fuse
            .as_ref()
            .ok_or_else(|| Error::Activation("the pool daemon is stopping".into()))?;
        let name = id.to_string();
        let file = fuse.add(&name, thin, size, read_only)?;
        let options = LoopOptions {
            read_only,
            ..LoopOptions::default()
        };
        let device = match LoopDevice::attach(&file, options) {
            Ok(device) => device,
            Err(e) => {
                let _ = fuse.remove(&name);
                return Err(e);
            }
        };
        tracing::info!(thin_id = %id, device = %device.path().display(), "activated");
        let active = Active {
            device,
            file,
            read_only,
            deferred: false,
        };
        let described = active.describe(id);
        state.active.insert(id, active);
        Ok(described)
    }

    fn deactivate(&self, state: &mut State, id: ThinId, deferred: bool) -> Result<()> {
        // A thin that is not active is done, as device-mapper's remove of a device that is
        // gone is for the kernel backend: two deactivations may race (a container's
        // supervisor when it stops, and `rm -f` right after `kill`).
        let Some(active) = state.active.get_mut(&id) else {
            return Ok(());
        };
        if deferred {
            active.device.detach_deferred()?;
            active.deferred = true;
            // Idle devices detach at once; finish those now rather than at the next reap.
            if active.device.backing_file().is_none() {
                return self.finish_deactivate(state, id, true);
            }
            tracing::info!(thin_id = %id, "deactivation deferred until the device's last user closes it");
            return Ok(());
        }
        self.finish_deactivate(state, id, false)
    }

    /// Detaches the loop device (unless it already is) and withdraws the FUSE file.
    fn finish_deactivate(&self, state: &mut State, id: ThinId, detached: bool) -> Result<()> {
        let Some(active) = state.active.get(&id) else {
            return Ok(());
        };
        if !detached && active.device.backing_file().as_deref() == Some(active.file.as_path()) {
            active.device.detach()?;
        }
        let active = state.active.remove(&id).expect("checked above");
        if let Some(fuse) = self.fuse.lock().as_ref() {
            let thin = fuse.remove(&id.to_string())?;
            thin.flush()?;
        }
        tracing::info!(thin_id = %id, device = %active.device.path().display(), "deactivated");
        Ok(())
    }

    /// Finishes deferred deactivations whose devices the kernel has detached, and forgets
    /// activations whose loop device someone else detached.
    fn reap_deferred(&self) {
        let mut state = self.state.lock();
        if state.stopping {
            return;
        }
        let gone: Vec<ThinId> = state
            .active
            .iter()
            .filter(|(_, a)| a.device.backing_file().as_deref() != Some(a.file.as_path()))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if !state.active[&id].deferred {
                tracing::warn!(thin_id = %id, "its loop device was detached behind our back");
            }
            if let Err(e) = self.finish_deactivate(&mut state, id, true) {
                tracing::warn!(thin_id = %id, "finishing deactivation: {e}");
            }
        }
    }
}

/// A connection counted in [`MAX_CLIENTS`], until its thread ends (or never starts).
struct Admitted {
    daemon: Arc<Daemon>,
    number: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.daemon.clients.lock().streams.remove(&self.number);
    }
}

/// Tells a connection past [`MAX_CLIENTS`] why (as the reply to its first request) and
/// closes it.
fn refuse_client(mut stream: UnixStream) {
    tracing::warn!("refused a client: {MAX_CLIENTS} clients are connected already");
    let e = Error::Busy {
        what: "the pool daemon".into(),
        holder: format!("{MAX_CLIENTS} clients are connected"),
    };
    // A fresh socket's buffer takes the line at once; never wait for this client.
    if stream.set_nonblocking(true).is_ok() {
        let _ = send(&mut stream, &Reply::failed(&e));
    }
}

/// Cleans up after a daemon that died: loop devices pointing into its FUSE mount are
/// detached (at once when idle, else when their users close them), the dead mount is
/// detached, and the socket file removed.
fn clean_stale(run: &RunDir) -> Result<()> {
    let mountpoint = run.fuse_dir();
    for device in LoopDevice::all() {
        let Some(backing) = device.backing_file() else {
            continue;
        };
        if backing.starts_with(&mountpoint) {
            let users = device.users();
            if !users.is_empty() {
                tracing::warn!(
                    device = %device.path().display(),
                    "left behind by a daemon that died and still in use ({}); it detaches when \
                     they close it",
                    users.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                );
            }
            device.detach_deferred()?;
        }
    }
    if loopdev::mount_points().contains(&mountpoint) {
        tracing::warn!(mount = %mountpoint.display(), "detaching the FUSE mount of a daemon that died");
        nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
            activation_error(
                format_args!("failed to unmount {}", mountpoint.display()),
                e,
            )
        })?;
    }
    let socket = run.socket();
    if socket.exists() {
        fs::remove_file(&socket).map_err(|e| {
            activation_error(format_args!("failed to remove {}", socket.display()), e)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::activate::daemon::Client;
    use crate::activate::PoolControl;
    use crate::store::VolumeStore;
    use crate::thin::files::NewPool;
    use crate::units::DataBlockSize;

    const MIB: u64 = 1 << 20;

    /// A daemon of a new pool in `dir`, without the FUSE export (nothing here activates).
    fn daemon(dir: &std::path::Path) -> Arc<Daemon> {
        let pool = dir.join("pool");
        let run = dir.join("run");
        for d in [&pool, &run] {
            fs::create_dir(d).unwrap();
        }
        let volumes = Volumes::create(
            &PoolPaths::in_dir(&pool),
            &VolumeStore::path_in(&pool),
            NewPool::new(64 * MIB, 8 * MIB, DataBlockSize::DEFAULT),
            PoolOptions::default(),
        )
        .unwrap();
        Arc::new(Daemon::new(RunDir::new(run), volumes, None))
    }

    /// Shuts the daemon down when dropped, so that a failed test leaves no thread behind.
    struct ShutdownOnDrop(Option<Arc<Daemon>>);

    impl ShutdownOnDrop {
        fn now(mut self) -> Result<()> {
            self.0.take().expect("not shut down yet").shutdown()
        }
    }

    impl Drop for ShutdownOnDrop {
        fn drop(&mut self) {
            if let Some(daemon) = self.0.take() {
                let _ = daemon.shutdown();
            }
        }
    }

    /// Found by review: a stop was checked (nothing active, no NBD server) under the state
    /// lock, which was then let go until the shutdown took it again. Anything let in between
    /// was accepted and then cut off: an NBD server or an activation (ended by the
    /// shutdown), a write (running while the shutdown commits). The requests come here
    /// right after the granted stop, where that window was.
    #[test]
    fn a_granted_stop_refuses_every_request_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        let create = |id| Request::CreateThin {
            id,
            size_bytes: MIB,
            name: None,
        };
        daemon.handle(&create(1), &mut []).unwrap();
        daemon
            .handle(&Request::Stop { force: false }, &mut [])
            .unwrap();
        let write = Request::Write {
            id: 1,
            offset: 0,
            length: 4096,
        };
        for (request, mut buf) in [(create(2), vec![]), (write, vec![7; 4096])] {
            let err = daemon.handle(&request, &mut buf).unwrap_err();
            assert!(err.to_string().contains("stopping"), "{request:?}: {err}");
        }
        let nbd = Listen::Unix(dir.path().join("nbd.sock"));
        let err = daemon.serve_nbd(&nbd, &[1], false).err().expect("refused");
        assert!(err.to_string().contains("stopping"), "{err}");
    }

    /// A granted stop leaves the daemon refusing everything, so it must stop even when the
    /// client that asked is gone before the reply reaches it.
    #[test]
    fn a_granted_stop_stops_the_daemon_even_if_its_reply_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        let (mut client, server) = UnixStream::pair().unwrap();
        send(&mut client, &Request::Stop { force: false }).unwrap();
        drop(client);
        daemon.serve_client(server);
        assert!(*daemon.stop.lock(), "the stop was not passed on");
    }

    /// Found by review: every connection got a thread of its own, however many were open.
    /// The ones past the cap are told why and closed, the daemon goes on answering, a place
    /// freed is taken again, and a shutdown ends the idle connections still open.
    #[test]
    fn clients_past_the_cap_are_refused_and_the_daemon_still_answers() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        daemon.listen().unwrap();
        let shutdown = ShutdownOnDrop(Some(daemon.clone()));
        let socket = daemon.run_dir.socket();
        let connect = || {
            Client::connect(&socket)
                .unwrap()
                .expect("the daemon listens")
        };
        // Each one answered is counted in before the next connects.
        let mut held: Vec<Client> = (0..MAX_CLIENTS)
            .map(|_| {
                let mut c = connect();
                c.status().unwrap();
                c
            })
            .collect();
        let mut extra = connect();
        let err = extra.status().unwrap_err();
        assert!(matches!(err, Error::Busy { .. }), "{err}");
        let err = extra.status().unwrap_err();
        assert!(err.to_string().contains("lost the connection"), "{err}");

        // The daemon lets go of a closed connection's place when its thread sees the end.
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match connect().status() {
                Ok(_) => break,
                Err(Error::Busy { .. }) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("a client after a place was freed: {e}"),
            }
        }

        shutdown.now().unwrap();
        for mut c in held {
            let err = c.status().unwrap_err();
            assert!(err.to_string().contains("lost the connection"), "{err}");
        }
    }
}
