//! A real Docker engine on a test-bed host: `dockerd` in the host's network namespace,
//! with its own data root, exec root and socket, and a test image built `FROM scratch`
//! with Debian's static busybox (no registry is reachable).
//!
//! dockerd is entered into the namespace with `nsenter --net`, not `ip netns exec`:
//! the latter mounts a private /sys, which hides the cgroup hierarchies dockerd needs.
//! As on a freshly booted Docker host, forwarding is off until dockerd turns it on,
//! so dockerd sets its iptables FORWARD policy to DROP, as users' hosts have it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::cluster::wait_for;
use crate::run::{sh, sh_ok};

pub const IMAGE: &str = "netagent-test-busybox";

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
}

impl DockerHost {
    /// Starts dockerd in `netns`, keeping its files under `dir`, and builds the image.
    pub fn start(netns: &str, dir: &Path) -> Self {
        Self::start_with(netns, dir, &[])
    }

    /// As [`DockerHost::start`], with more dockerd flags.
    pub fn start_with(netns: &str, dir: &Path, flags: &[&str]) -> Self {
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
        };
        host.start_engine();
        let img = dir.join("img");
        std::fs::create_dir_all(&img).unwrap();
        std::fs::copy("/bin/busybox", img.join("busybox"))
            .expect("/bin/busybox (Debian's busybox-static)");
        std::fs::write(
            img.join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nRUN [\"/bin/mkdir\", \"-p\", \"/www\", \"/tmp\"]\n",
        )
        .unwrap();
        host.docker_ok(&["build", "-q", "-t", IMAGE, img.to_str().unwrap()]);
        host
    }

    /// Starts dockerd (again) and waits until it answers.
    pub fn start_engine(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap();
        let d = |p: &str| self.dir.join(p).display().to_string();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
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
