use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use super::*;
use crate::generate::{Ca, Validity};

struct Files {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            ca: Ca::new("test CA").unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn server(&self, validity: Validity) -> ServerFiles {
        let issued = self.ca.issue_with(&["lb.test"], validity).unwrap();
        let (cert, key) = issued.write(self.dir.path(), "server").unwrap();
        ServerFiles {
            cert,
            key,
            client_ca: None,
        }
    }
}

fn message(error: TlsError) -> String {
    error.to_string()
}

#[test]
fn a_good_pair_loads_with_h2() {
    let files = Files::new();
    let mut server = files.server(Validity::Current);
    assert_eq!(server.load().unwrap().alpn_protocols, [b"h2".to_vec()]);
    server.client_ca = Some(files.write("ca.crt", files.ca.cert()));
    server.load().unwrap();
    let client = ClientFiles {
        roots: Roots::File(files.path("ca.crt")),
        identity: Some((server.cert.clone(), server.key.clone())),
    };
    assert_eq!(client.load().unwrap().alpn_protocols, [b"h2".to_vec()]);
    assert_eq!(client.paths().len(), 3);
}

#[test]
fn each_bad_file_is_named_with_its_reason() {
    let files = Files::new();
    let good = files.server(Validity::Current);
    let case = |cert: &Path, key: &Path| {
        message(
            ServerFiles {
                cert: cert.to_owned(),
                key: key.to_owned(),
                client_ca: None,
            }
            .load()
            .unwrap_err(),
        )
    };
    let missing = files.path("missing.crt");
    let error = case(&missing, &good.key);
    assert!(
        error.contains("missing.crt") && error.contains("No such file"),
        "{error}"
    );

    let garbage = files.write("garbage.pem", "not a certificate\n");
    let error = case(&garbage, &good.key);
    assert!(
        error.contains("garbage.pem") && error.contains("no PEM certificate"),
        "{error}"
    );
    let error = case(&good.cert, &garbage);
    assert!(
        error.contains("garbage.pem") && error.contains("no PEM private key"),
        "{error}"
    );

    let other = files.ca.issue(&["other.test"]).unwrap();
    let other_key = files.write("other.key", &other.key);
    let error = case(&good.cert, &other_key);
    assert!(
        error.contains("does not match") && error.contains("other.key"),
        "{error}"
    );

    let expired = files
        .ca
        .issue_with(&["lb.test"], Validity::Expired)
        .unwrap();
    let (cert, key) = expired.write(files.dir.path(), "expired").unwrap();
    let error = case(&cert, &key);
    assert!(
        error.contains("expired.crt") && error.contains("expired on"),
        "{error}"
    );

    let early = files.ca.issue_with(&["lb.test"], Validity::NotYet).unwrap();
    let (cert, key) = early.write(files.dir.path(), "early").unwrap();
    let error = case(&cert, &key);
    assert!(error.contains("not valid until"), "{error}");

    let client = ClientFiles {
        roots: Roots::File(garbage),
        identity: None,
    };
    assert!(message(client.load().unwrap_err()).contains("garbage.pem"));
}

/// Waits until `reports` holds `n` entries.
async fn reported(
    reports: &Arc<Mutex<Vec<Result<(), String>>>>,
    n: usize,
) -> Vec<Result<(), String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = reports.lock().unwrap().clone();
        if now.len() >= n {
            return now;
        }
        assert!(tokio::time::Instant::now() < deadline, "reports: {now:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The way the kubelet updates a Secret volume: the files are links through
/// `..data`, a link to a directory of this version, swapped by a rename.
fn secret_version(dir: &Path, version: &str, files: &[(&str, &str)]) {
    let versioned = dir.join(version);
    std::fs::create_dir(&versioned).unwrap();
    for (name, contents) in files {
        std::fs::write(versioned.join(name), contents).unwrap();
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[tokio::test]
async fn a_secret_rotation_is_picked_up_and_a_broken_one_keeps_the_last_good() {
    let files = Files::new();
    let first = files.ca.issue(&["lb.test"]).unwrap();
    let secret = files.dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    secret_version(
        &secret,
        "v1",
        &[("tls.crt", &first.cert), ("tls.key", &first.key)],
    );
    let server = ServerFiles {
        cert: secret.join("tls.crt"),
        key: secret.join("tls.key"),
        client_ca: None,
    };
    let reloading = Reloading::new(server.load().unwrap());
    let before = reloading.current();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = reports.clone();
    let load = server.clone();
    let _watch = reloading.watch(
        server.paths(),
        move || load.load(),
        move |result| sink.lock().unwrap().push(result.map_err(|e| e.to_string())),
    );

    let second = files.ca.issue(&["lb.test"]).unwrap();
    secret_version(
        &secret,
        "v2",
        &[("tls.crt", &second.cert), ("tls.key", &second.key)],
    );
    assert_eq!(reported(&reports, 1).await, [Ok(())]);
    let after = reloading.current();
    assert!(
        !Arc::ptr_eq(&before, &after),
        "a new configuration is in use"
    );

    // A key that does not match: reported once, the last good one stays.
    let third = files.ca.issue(&["lb.test"]).unwrap();
    secret_version(
        &secret,
        "v3",
        &[("tls.crt", &third.cert), ("tls.key", &second.key)],
    );
    let reports_now = reported(&reports, 2).await;
    assert!(
        reports_now[1]
            .as_ref()
            .unwrap_err()
            .contains("does not match"),
        "{reports_now:?}"
    );
    assert!(Arc::ptr_eq(&after, &reloading.current()));
}
