//! Process-level criteria: executable names, listening ports, and processes that already
//! export OTLP themselves.

use std::{collections::HashSet, fs, path::Path};

/// What selection needs to know about one process, read from /proc.
#[derive(Clone, Debug, Default)]
pub struct ProcInfo {
    /// File name of /proc/PID/exe (`python3.11`).
    pub exe: Option<String>,
    /// /proc/PID/comm (`uvicorn` when the process set its name).
    pub comm: Option<String>,
    pub environ: Vec<u8>,
    pub cmdline: Vec<u8>,
}

impl ProcInfo {
    pub fn read(proc_root: &Path, pid: u32) -> Option<ProcInfo> {
        let dir = proc_root.join(pid.to_string());
        let comm = fs::read_to_string(dir.join("comm")).ok()?.trim().to_owned();
        Some(ProcInfo {
            exe: fs::read_link(dir.join("exe")).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
            comm: Some(comm),
            environ: fs::read(dir.join("environ")).unwrap_or_default(),
            cmdline: fs::read(dir.join("cmdline")).unwrap_or_default(),
        })
    }

    /// The names an executable glob is tried against.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.exe.iter().chain(self.comm.iter()).map(String::as_str)
    }
}

fn env_var<'a>(environ: &'a [u8], key: &str) -> Option<&'a str> {
    environ.split(|b| *b == 0).find_map(|v| {
        let v = std::str::from_utf8(v).ok()?;
        let (k, val) = v.split_once('=')?;
        (k == key).then_some(val)
    })
}

/// Why a process is taken to export OTLP traces itself, if it does. The signs, in order:
///
/// - `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`: it does not (an SDK is off);
/// - `OTEL_TRACES_EXPORTER` naming `otlp`: an SDK configured to export OTLP;
/// - `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set: somebody pointed
///   an SDK at a collector (OTLP is the SDKs' default exporter);
/// - an OpenTelemetry auto-instrumentation agent loaded: `-javaagent:...opentelemetry...` in the
///   command line or `JAVA_TOOL_OPTIONS`, `opentelemetry-instrument`'s sitecustomize on
///   `PYTHONPATH`, `@opentelemetry/auto-instrumentations-node` in `NODE_OPTIONS`, the
///   OpenTelemetry .NET profiler.
///
/// `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` alone are not a sign: they name a service
/// (tapwire reads them too) without saying that anything exports.
pub fn otlp_exporter_reason(environ: &[u8], cmdline: &[u8]) -> Option<&'static str> {
    let get = |k| env_var(environ, k).map(str::trim).filter(|v| !v.is_empty());
    if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    if let Some(exporters) = get("OTEL_TRACES_EXPORTER") {
        let names: Vec<String> = exporters.split(',').map(|s| s.trim().to_ascii_lowercase()).collect();
        if names.iter().any(|n| n == "otlp") {
            return Some("OTEL_TRACES_EXPORTER names otlp");
        }
        if names.iter().all(|n| n == "none") {
            return None;
        }
    }
    if get("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() || get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some() {
        return Some("an OTLP endpoint is configured in its environment");
    }
    let javaagent = |s: &str| s.split(['\0', ' ']).any(|a| a.starts_with("-javaagent:") && a.to_ascii_lowercase().contains("opentelemetry"));
    if javaagent(&String::from_utf8_lossy(cmdline)) || get("JAVA_TOOL_OPTIONS").is_some_and(javaagent) {
        return Some("the OpenTelemetry Java agent is loaded");
    }
    if get("PYTHONPATH").is_some_and(|p| p.contains("opentelemetry/instrumentation/auto_instrumentation")) {
        return Some("it runs under opentelemetry-instrument");
    }
    if get("NODE_OPTIONS").is_some_and(|p| p.contains("@opentelemetry/auto-instrumentations-node")) {
        return Some("the OpenTelemetry Node.js auto-instrumentation is loaded");
    }
    if get("CORECLR_PROFILER").is_some_and(|p| p.eq_ignore_ascii_case("{918728DD-259F-4A6A-AC2B-B85E1B658318}")) {
        return Some("the OpenTelemetry .NET profiler is loaded");
    }
    None
}

/// TCP ports `pid` listens on: LISTEN sockets of its network namespace
/// (/proc/PID/net/tcp, tcp6) whose inode is one of its open file descriptors.
pub fn listening_ports(proc_root: &Path, pid: u32) -> HashSet<u16> {
    let dir = proc_root.join(pid.to_string());
    let mut listening: Vec<(u64, u16)> = Vec::new();
    for file in ["net/tcp", "net/tcp6"] {
        if let Ok(text) = fs::read_to_string(dir.join(file)) {
            listening.extend(parse_listen_sockets(&text));
        }
    }
    if listening.is_empty() {
        return HashSet::new();
    }
    let mut inodes = HashSet::new();
    if let Ok(fds) = fs::read_dir(dir.join("fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse::<u64>().ok()) {
                    inodes.insert(n);
                }
            }
        }
    }
    listening.into_iter().filter(|(inode, _)| inodes.contains(inode)).map(|(_, port)| port).collect()
}

/// (inode, local port) of the LISTEN (state 0A) sockets in a /proc/net/tcp table.
pub fn parse_listen_sockets(text: &str) -> Vec<(u64, u16)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                return None;
            }
            let port = u16::from_str_radix(f[1].rsplit_once(':')?.1, 16).ok()?;
            Some((f[9].parse().ok()?, port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_exporters_are_recognised() {
        let yes: &[(&[u8], &[u8])] = &[
            (b"OTEL_TRACES_EXPORTER=otlp\0", b""),
            (b"OTEL_TRACES_EXPORTER=console,otlp\0", b""),
            (b"OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317\0OTEL_SERVICE_NAME=a\0", b""),
            (b"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://c:4318/v1/traces\0", b""),
            (b"", b"java\0-javaagent:/otel/opentelemetry-javaagent.jar\0-jar\0app.jar\0"),
            (b"JAVA_TOOL_OPTIONS=-Xmx1g -javaagent:/opt/opentelemetry-javaagent.jar\0", b"java\0"),
            (b"PYTHONPATH=/venv/lib/python3.11/site-packages/opentelemetry/instrumentation/auto_instrumentation:/app\0", b"python3\0"),
            (b"NODE_OPTIONS=--require @opentelemetry/auto-instrumentations-node/register\0", b"node\0"),
            (b"CORECLR_PROFILER={918728DD-259F-4A6A-AC2B-B85E1B658318}\0", b"dotnet\0"),
        ];
        for (env, cmd) in yes {
            assert!(otlp_exporter_reason(env, cmd).is_some(), "{:?} {:?}", String::from_utf8_lossy(env), String::from_utf8_lossy(cmd));
        }
        let no: &[(&[u8], &[u8])] = &[
            (b"OTEL_SERVICE_NAME=checkout\0OTEL_RESOURCE_ATTRIBUTES=service.namespace=shop\0", b"python3\0"),
            (b"OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4317\0OTEL_SDK_DISABLED=true\0", b""),
            (b"OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4317\0OTEL_TRACES_EXPORTER=none\0", b""),
            (b"OTEL_EXPORTER_OTLP_ENDPOINT=\0", b""),
            (b"", b"java\0-javaagent:/opt/jmx_prometheus.jar\0"),
            (b"PATH=/bin\0", b"nginx\0"),
        ];
        for (env, cmd) in no {
            assert_eq!(otlp_exporter_reason(env, cmd), None, "{:?}", String::from_utf8_lossy(env));
        }
    }

    #[test]
    fn listen_sockets_from_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 43210 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 43999 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(parse_listen_sockets(text), vec![(43210, 8080), (555, 80)]);
    }

    #[test]
    fn own_listening_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ports = listening_ports(Path::new("/proc"), std::process::id());
        assert!(ports.contains(&port), "{port} not in {ports:?}");
        drop(listener);
        assert!(!listening_ports(Path::new("/proc"), std::process::id()).contains(&port));
    }
}
