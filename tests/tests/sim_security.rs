//! firmware-sim's connection options against a real broker (Debian's mosquitto): TLS with a CA
//! made here by the openssl command, and username/password.

use std::process::Command;

use edgehose_tests::*;

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn devices_connect_over_tls_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A CA, and a server certificate for 127.0.0.1 signed by it.
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=edgehose test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    let passwd = d.join("passwd");
    let out = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["device", "s3cret"])
        .output()
        .expect("mosquitto_passwd (apt-get install mosquitto)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let broker = Mosquitto::start_with(
        d,
        &format!(
            "cafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n\
             allow_anonymous false\npassword_file {}\n",
            passwd.display(),
            d = d.display()
        ),
    )
    .unwrap();
    let ca = d.join("ca.crt");
    let ca = ca.to_str().unwrap();
    let s = run_sim(
        broker.port,
        &[
            "-n",
            "5",
            "-m",
            "20",
            "--rate",
            "0",
            "--tls-ca",
            ca,
            "--username",
            "device",
            "--password",
            "s3cret",
        ],
    )
    .unwrap();
    assert_eq!(s["acknowledged"], 100, "{s}");

    // A wrong password is refused: the devices give up after their reconnect budget.
    let err = run_sim(
        broker.port,
        &[
            "-n",
            "1",
            "-m",
            "1",
            "--tls-ca",
            ca,
            "--username",
            "device",
            "--password",
            "wrong",
            "--max-reconnects",
            "1",
            "--timeout-secs",
            "10",
        ],
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("failed"), "{err:#}");
}
