//! The wire's protections end to end on loopback: TLS with client certificates and the
//! shared token together, what a client missing either gets, and health checks, which
//! need no token (but, under mutual TLS, a client certificate like every connection).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use l2l_tests::{Coordinator, Host, start_worker_on, text, version};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Writes a CA, a server certificate for `localhost` and a client certificate, as PEM.
fn certificates(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, sans) in [
        ("server", vec!["localhost".to_string()]),
        ("client", vec!["worker".to_string()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

/// `l2l-coordinator status` on `host` against `url`: success and stderr.
fn status_on(host: &Host, url: &str) -> (bool, String) {
    let out = host
        .command("l2l-coordinator")
        .args(["status", "--coordinator", url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.success(), text(&out).1)
}

#[test]
fn mutual_tls_and_a_token_train_and_refuse_what_they_should() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certificates(d);
    std::fs::write(d.join("token"), "security-test-token-a81f3c20d9\n").unwrap();
    let token = ("L2L_TOKEN_FILE".to_string(), path(d, "token"));
    let mut coordinator = Coordinator::serve_on(
        &Host {
            netns: None,
            env: vec![token.clone()],
        },
        None,
        &d.join("run"),
        "127.0.0.1:0",
        &[
            "--tls-cert",
            &path(d, "server.pem"),
            "--tls-key",
            &path(d, "server.key"),
            "--tls-client-ca",
            &path(d, "ca.pem"),
            "--quorum",
            "1",
        ],
    );
    let port = coordinator.addr.port();
    coordinator.url = format!("https://localhost:{port}");
    let client_env = |with_token: bool, with_cert: bool| {
        let mut env = vec![("L2L_TLS_CA".to_string(), path(d, "ca.pem"))];
        if with_token {
            env.push(token.clone());
        }
        if with_cert {
            env.push(("L2L_TLS_CERT".into(), path(d, "client.pem")));
            env.push(("L2L_TLS_KEY".into(), path(d, "client.key")));
        }
        Host { netns: None, env }
    };
    coordinator.host = client_env(true, true);

    // A worker with the CA, its certificate and the token trains.
    let _worker = start_worker_on(&coordinator.host, &coordinator.url, "tls", &d.join("w.log"));
    let s = coordinator.wait_for(Duration::from_secs(60), "training over TLS", |s| {
        version(s) >= 5
    });
    assert_eq!(s["workers"][0]["name"], "tls");

    // What each missing piece gets, and that the message says which piece.
    let url = coordinator.url.clone();
    let (ok, err) = status_on(&client_env(false, true), &url);
    assert!(!ok && err.contains("token"), "no token: {err}");
    let (ok, err) = status_on(&client_env(true, false), &url);
    assert!(
        !ok && err.contains("give --tls-cert and --tls-key"),
        "no client certificate must not connect, and the error says what to do: {err}"
    );
    // A client that trusts another CA refuses the server's certificate.
    let other = d.join("other-ca");
    std::fs::create_dir_all(&other).unwrap();
    certificates(&other);
    let mut wrong_ca = client_env(true, true);
    wrong_ca.env[0].1 = path(&other, "ca.pem");
    let (ok, err) = status_on(&wrong_ca, &url);
    assert!(
        !ok && err.contains("invalid peer certificate"),
        "a server certificate from an unknown CA must be refused, saying so: {err}"
    );
    // A client certificate from another CA is refused by the server.
    let mut foreign = client_env(true, true);
    foreign.env[2].1 = path(&other, "client.pem");
    foreign.env[3].1 = path(&other, "client.key");
    let (ok, err) = status_on(&foreign, &url);
    assert!(
        !ok && err.contains("trusts the CA that signed --tls-cert"),
        "a client certificate from an unknown CA must be refused: {err}"
    );
    // Plain TCP (no TLS settings at all) to the TLS port: no gRPC answer comes back.
    let (ok, err) = status_on(
        &Host {
            netns: None,
            env: vec![token.clone()],
        },
        &format!("http://127.0.0.1:{port}"),
    );
    assert!(
        !ok && err.contains("use an https:// URL"),
        "plain TCP to a TLS port must fail, and say what to do: {err}"
    );
    // TLS files with an http:// URL: refused before connecting, with the fix.
    let (ok, err) = status_on(&client_env(true, true), &format!("http://127.0.0.1:{port}"));
    assert!(!ok && err.contains("use https://"), "{err}");
    let (ok, err) = status_on(&client_env(true, true), &url);
    assert!(ok, "everything given: {err}");

    // Health checks: readiness and liveness, with the client certificate but no token.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                std::fs::read(d.join("ca.pem")).unwrap(),
            ))
            .identity(Identity::from_pem(
                std::fs::read(d.join("client.pem")).unwrap(),
                std::fs::read(d.join("client.key")).unwrap(),
            ));
        let ch = Channel::from_shared(url.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("connects with the client certificate");
        let mut health = HealthClient::new(ch);
        for service in ["", "liveness"] {
            let r = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health answers without a token")
                .into_inner();
            assert_eq!(r.status(), ServingStatus::Serving, "service {service:?}");
        }
    });
}

#[test]
fn local_honours_the_token_and_tls_flags_like_serve() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certificates(d);
    std::fs::write(d.join("token"), "local-test-token-9d2e4f6a1b\n").unwrap();
    let token = ("L2L_TOKEN_FILE".to_string(), path(d, "token"));
    let mut local = l2l_tests::Proc {
        child: std::process::Command::new(l2l_tests::binary("l2l-coordinator"))
            .args(["local", "--workers", "1", "--max-updates", "300"])
            .args(["--eval-problems", "1", "--dir", &path(d, "run")])
            .args(["--tls-cert", &path(d, "server.pem")])
            .args(["--tls-key", &path(d, "server.key")])
            .args(["--tls-client-ca", &path(d, "ca.pem")])
            .args(["--tls-ca", &path(d, "ca.pem")])
            .args(["--worker-tls-cert", &path(d, "client.pem")])
            .args(["--worker-tls-key", &path(d, "client.key")])
            .env(&token.0, &token.1)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(d.join("local.log")).unwrap())
            .spawn()
            .unwrap(),
    };
    let stdout = local.child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| {
                panic!(
                    "local never listened: {}",
                    std::fs::read_to_string(d.join("local.log")).unwrap()
                )
            })
            .unwrap();
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.parse::<std::net::SocketAddr>().unwrap();
        }
    };
    let url = format!("https://localhost:{}", addr.port());
    let client = |with_token: bool| {
        let mut env = vec![
            ("L2L_TLS_CA".to_string(), path(d, "ca.pem")),
            ("L2L_TLS_CERT".into(), path(d, "client.pem")),
            ("L2L_TLS_KEY".into(), path(d, "client.key")),
        ];
        if with_token {
            env.push(token.clone());
        }
        Host { netns: None, env }
    };
    let (ok, err) = status_on(&client(false), &url);
    assert!(!ok && err.contains("token"), "no token: {err}");
    let plain = Host {
        netns: None,
        env: vec![token.clone()],
    };
    let (ok, err) = status_on(&plain, &format!("http://{addr}"));
    assert!(
        !ok && err.contains("use an https:// URL"),
        "plain TCP to local's TLS port must fail, and say what to do: {err}"
    );
    let (ok, err) = status_on(&client(true), &url);
    assert!(ok, "token and certificate: {err}");
    // Its own worker presented both: the run trains to its end.
    let status = local.wait_exit(Duration::from_secs(300));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        status.success(),
        "local failed: {}",
        std::fs::read_to_string(d.join("local.log")).unwrap()
    );
    assert!(
        rest.iter()
            .any(|l| l.contains("learned optimizer φ written to")),
        "{rest:?}"
    );
}
