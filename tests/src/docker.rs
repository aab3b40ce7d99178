//! A real Docker engine on a test-bed host: `dockerd` in the host's network namespace,
//! with its own data root, exec root and socket, and a test image built `FROM scratch`
//! with Debian's static busybox (no registry is reachable).
//!
//! dockerd is entered into the namespace with `nsenter --net`, not `ip netns exec`:
//! the latter mounts a private /sys, which hides the cgroup hierarchies dockerd needs.
//! As on a freshly booted Docker host, forwarding is off until dockerd turns it on,
//! so dockerd sets its iptables FORWARD policy to DROP, as users' hosts have it.
//!
//! [`DockerHost::start_with_plugins`] also gives dockerd a mount namespace of its own
//! in which `<dir>/plugins` is /run/docker/plugins: the legacy plugin directory is one
//! per machine, and each test engine must find only its own host's plugin socket.
//! `<dir>` is a shared mount, so the network namespaces dockerd mounts under it
//! (its containers' SandboxKeys) are visible to agents in the root mount namespace.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::cluster::wait_for;
use crate::run::{sh, sh_ok};

pub const IMAGE: &str = "netagent-test-busybox";

/// Where a test dockerd takes the subnets of networks it makes by itself
/// (`docker_gwbridge`): [`GATEWAY_POOL`], in /24s.
const GATEWAY_POOL_FLAG: &str = "base=100.126.0.0/16,size=24";
pub const GATEWAY_POOL: &str = "100.126.0.0/16";

/// Root, dockerd and busybox, or a printed skip (a failure under CI=true).
pub fn require_docker(test: &str) -> bool {
    if !crate::run::require_root(test) {
        return false;
    }
    let ok = sh("command -v dockerd && command -v docker && test -x /bin/busybox")
        .status
        .success();
    if !ok {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "{test}: needs dockerd, the docker CLI and /bin/busybox (scripts/deps.sh installs them)"
        );
        eprintln!("SKIPPED {test}: needs dockerd, docker and busybox-static");
    }
    ok
}

pub struct DockerHost {
    pub netns: String,
    pub socket: PathBuf,
    dir: PathBuf,
    dockerd: Option<Child>,
    /// More dockerd flags (e.g. `--storage-driver vfs`).
    flags: Vec<String>,
    /// dockerd runs in its own mount namespace with `<dir>/plugins` as its plugin directory.
    own_plugin_dir: bool,
}

/// A file for [`DockerHost::build_image`].
pub enum ImageFile<'a> {
    /// These bytes.
    Bytes(&'a [u8]),
    /// A copy of this file on the test machine.
    Copy(&'a Path),
}

/// Run by `unshare --mount` before dockerd: `$1` (the host's plugin directory) becomes
/// /run/docker/plugins and `$2` (an empty directory) hides the machine's plugin spec
/// directories; `$3` is the network namespace. The mount holding /run/docker/plugins
/// is made private (only it: `<dir>` must stay shared) so these mounts stay here.
const PLUGIN_DIR_SETUP: &str = r#"set -e
mkdir -p /run/docker/plugins
mount --make-private "$(findmnt -n -o TARGET --target /run/docker/plugins)"
mount --bind "$1" /run/docker/plugins
for spec in /etc/docker/plugins /usr/lib/docker/plugins; do
  if [ -d "$spec" ]; then mount --bind "$2" "$spec"; fi
done
netns=$3
shift 3
exec nsenter --net="$netns" "$@"
"#;

impl DockerHost {
    /// Starts dockerd in `netns`, keeping its files under `dir`, and builds the image.
    pub fn start(netns: &str, dir: &Path) -> Self {
        Self::start_with(netns, dir, &[])
    }

    /// As [`DockerHost::start`], with more dockerd flags.
    pub fn start_with(netns: &str, dir: &Path, flags: &[&str]) -> Self {
        Self::launch(netns, dir, flags, false)
    }

    /// As [`DockerHost::start`], with dockerd seeing [`DockerHost::plugin_dir`] (and
    /// nothing else) as its legacy plugin directory /run/docker/plugins.
    pub fn start_with_plugins(netns: &str, dir: &Path) -> Self {
        // Networks Docker makes by itself (its gateway bridge for driver networks'
        // egress) inside the test ranges too.
        Self::launch(
            netns,
            dir,
            &["--default-address-pool", GATEWAY_POOL_FLAG],
            true,
        )
    }

    fn launch(netns: &str, dir: &Path, flags: &[&str], own_plugin_dir: bool) -> Self {
        remove_stale();
        std::fs::create_dir_all(dir).unwrap();
        sh_ok(&format!(
            "ip netns exec {netns} sysctl -qw net.ipv4.ip_forward=0"
        ));
        let mut host = DockerHost {
            netns: netns.to_owned(),
            socket: dir.join("docker.sock"),
            dir: dir.to_owned(),
            dockerd: None,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            own_plugin_dir,
        };
        if own_plugin_dir {
            std::fs::create_dir_all(host.plugin_dir()).unwrap();
            std::fs::create_dir_all(dir.join("no-plugin-specs")).unwrap();
            // Shared, so what dockerd mounts under `dir` in its namespace shows here too.
            sh_ok(&format!(
                "mount --bind {d} {d} && mount --make-shared {d}",
                d = dir.display()
            ));
        }
        host.start_engine();
        host.build_image(
            IMAGE,
            &[("/bin/busybox", ImageFile::Copy(Path::new("/bin/busybox")))],
            "RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nRUN [\"/bin/mkdir\", \"-p\", \"/www\", \"/tmp\"]\n",
        );
        host
    }

    /// Where this engine looks for legacy plugin sockets (with
    /// [`DockerHost::start_with_plugins`]): a plugin listening on `<dir>/NAME.sock` is
    /// the driver `NAME`.
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.join("plugins")
    }

    /// The running dockerd's process id.
    pub fn dockerd_pid(&self) -> Option<u32> {
        self.dockerd.as_ref().map(Child::id)
    }

    /// Builds image `name` `FROM scratch` with `files` (path in the image, content;
    /// all executable) and then the Dockerfile lines `dockerfile_extra`.
    pub fn build_image(&self, name: &str, files: &[(&str, ImageFile<'_>)], dockerfile_extra: &str) {
        let context = self.dir.join("images").join(name);
        let _ = std::fs::remove_dir_all(&context);
        std::fs::create_dir_all(&context).unwrap();
        let mut dockerfile = String::from("FROM scratch\n");
        for (i, (target, content)) in files.iter().enumerate() {
            let local = context.join(format!("f{i}"));
            match content {
                ImageFile::Bytes(bytes) => std::fs::write(&local, bytes).unwrap(),
                ImageFile::Copy(from) => {
                    std::fs::copy(from, &local)
                        .unwrap_or_else(|e| panic!("{}: {e}", from.display()));
                }
            }
            std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o755)).unwrap();
            dockerfile.push_str(&format!("COPY f{i} {target}\n"));
        }
        dockerfile.push_str(dockerfile_extra);
        std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();
        self.docker_ok(&["build", "-q", "-t", name, context.to_str().unwrap()]);
    }

    /// Runs Debian's `docker-compose` (1.29) against this engine in `project_dir`
    /// (`-f` paths are relative to it). Compose files see `BUSYBOX_IMAGE` set to the
    /// test image: no registry is reachable.
    pub fn compose(&self, project_dir: &Path, args: &[&str]) -> Output {
        Command::new("docker-compose")
            .current_dir(project_dir)
            .arg("--project-directory")
            .arg(project_dir)
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("BUSYBOX_IMAGE", IMAGE)
            .output()
            .expect("run docker-compose (Debian's docker-compose)")
    }

    /// [`DockerHost::compose`] that must succeed; returns its stdout.
    pub fn compose_ok(&self, project_dir: &Path, args: &[&str]) -> String {
        let out = self.compose(project_dir, args);
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts dockerd (again) and waits until it answers.
    pub fn start_engine(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap();
        let d = |p: &str| self.dir.join(p).display().to_string();
        let netns = format!("/run/netns/{}", self.netns);
        let mut command = if self.own_plugin_dir {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "unchanged", "sh", "-c"])
                .args([PLUGIN_DIR_SETUP, "sh"])
                .args([&d("plugins"), &d("no-plugin-specs"), &netns]);
            c
        } else {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={netns}"));
            c
        };
        // unshare, sh and nsenter each exec the next: the child's pid is dockerd's.
        let child = command
            .args([
                "dockerd",
                "--data-root",
                &d("data"),
                "--exec-root",
                &d("exec"),
            ])
            .args(["--pidfile", &d("dockerd.pid"), "-H"])
            .arg(format!("unix://{}", self.socket.display()))
            // docker0 inside the test ranges; nothing is sent through it.
            .args(["--bip", "100.127.0.1/24", "--log-level", "warn"])
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd (Debian's docker.io)");
        self.dockerd = Some(child);
        wait_for(Duration::from_secs(60), "dockerd to answer", || {
            self.docker(&["info", "--format", "{{.ServerVersion}}"])
                .status
                .success()
        });
    }

    /// Stops dockerd (SIGTERM, as systemctl stop does; it stops its containers).
    pub fn stop_engine(&mut self) {
        if let Some(mut child) = self.dockerd.take() {
            // SAFETY: kill takes no pointers; the pid is our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .expect("run the docker CLI")
    }

    /// Runs a docker command that must succeed; returns its stdout, trimmed.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `docker network create -d netagent --ipam-driver netagent --subnet SUBNET NAME`,
    /// which must succeed.
    pub fn create_netagent_network(&self, subnet: &str, name: &str) {
        self.docker_ok(&[
            "network",
            "create",
            "-d",
            "netagent",
            "--ipam-driver",
            "netagent",
            "--subnet",
            subnet,
            name,
        ]);
    }

    /// `docker run -d --network none` of the test image with these labels; returns
    /// the container's full id.
    pub fn run(&self, name: &str, labels: &[&str], extra: &[&str], cmd: &[&str]) -> String {
        let mut args = vec!["run", "-d", "--network", "none", "--name", name];
        for l in labels {
            args.extend(["--label", l]);
        }
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.extend_from_slice(cmd);
        self.docker_ok(&args)
    }

    /// A replica that answers HTTP on port 80 with its hostname (its short id).
    pub fn run_web(&self, name: &str, labels: &[&str], extra: &[&str]) -> String {
        self.run(
            name,
            labels,
            extra,
            &[
                "sh",
                "-c",
                "hostname > /www/index.html && exec httpd -f -p 80 -h /www",
            ],
        )
    }

    /// The container's main process (to enter its namespace from the test).
    pub fn pid(&self, container: &str) -> u32 {
        self.docker_ok(&["inspect", "-f", "{{.State.Pid}}", container])
            .parse()
            .unwrap()
    }

    /// `docker exec` that must succeed; stdout.
    pub fn exec_ok(&self, container: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", container];
        args.extend_from_slice(cmd);
        self.docker_ok(&args)
    }

    /// The addresses busybox nslookup prints for `name` inside `container`, in order.
    pub fn nslookup(&self, container: &str, name: &str) -> Vec<std::net::Ipv4Addr> {
        let out = self.docker(&["exec", container, "nslookup", "-type=a", name]);
        let text = String::from_utf8_lossy(&out.stdout);
        // Skip the server's own lines ("Server:", "Address: 127.0.0.11:53").
        text.split("Name:")
            .skip(1)
            .flat_map(|block| block.lines())
            .filter_map(|l| l.trim().strip_prefix("Address:"))
            .filter_map(|a| a.trim().parse().ok())
            .collect()
    }
}

/// The A records `name` has inside the namespace of process `pid`, asked with dig at
/// 127.0.0.11 (fast enough to time a change to within tens of milliseconds).
pub fn resolve_in(pid: u32, name: &str) -> Vec<std::net::Ipv4Addr> {
    let out = sh(&format!(
        "nsenter -n -t {pid} dig +short +tries=1 +time=1 @127.0.0.11 {name} A"
    ));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl Drop for DockerHost {
    fn drop(&mut self) {
        if self.dockerd.is_some() {
            let ids = self.docker(&["ps", "-aq"]);
            let ids = String::from_utf8_lossy(&ids.stdout).to_string();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
            if std::thread::panicking() {
                let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("--- dockerd in {} (last lines) ---", self.netns);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        self.stop_engine();
        remove_dir(&self.dir);
    }
}

/// Unmounts whatever dockerd left under `dir`, then removes it.
fn remove_dir(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let prefix = dir.display().to_string();
    let mut under: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in under {
        let _ = sh(&format!("umount -l {m}"));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Engines left by a killed test run (its process is gone): stopped and removed.
fn remove_stale() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("ntb") else {
            continue;
        };
        if !name.contains("-docker") {
            continue;
        }
        let owner: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if owner.is_empty() || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let dir = entry.path();
        if let Ok(pid) = std::fs::read_to_string(dir.join("dockerd.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill takes no pointers; the pid is a dockerd this test bed started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                for _ in 0..200 {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        remove_dir(&dir);
    }
}

/// A dockerd with its own plugin directory on every host of `c`, started first (as
/// at boot), then each host's agent following it and serving the network driver in
/// that directory. The engines must be dropped before `c`.
pub fn engines_with_driver(c: &mut crate::cluster::Cluster) -> Vec<DockerHost> {
    let hosts = c.bed.hosts.len();
    let engines: Vec<DockerHost> = (1..=hosts)
        .map(|h| {
            let dir = std::env::temp_dir().join(format!("{}-docker{h}", c.bed.id));
            DockerHost::start_with_plugins(&c.bed.hosts[h - 1].netns, &dir)
        })
        .collect();
    for (i, e) in engines.iter().enumerate() {
        c.docker_sockets[i] = Some(e.socket.clone());
        c.plugin_sockets[i] = Some(e.plugin_dir().join("netagent.sock"));
    }
    for h in 1..=hosts {
        c.start_agent(h);
    }
    engines
}
