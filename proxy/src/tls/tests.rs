//! Loading a listener's files whole: every bad file is refused naming its key,
//! its path and the real cause; good and legitimately odd files load.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DnType, KeyPair};

use super::ListenerTls;
use crate::config::{Config, ListenerConfig, Overrides};

/// An X.509 version 1 certificate and its key, made once with OpenSSL 3
/// (`openssl x509 -req` without extensions makes version 1; rcgen
/// cannot): `openssl req -new -key v1.key -subj /CN=legacy.partner.example
/// | openssl x509 -req -key v1.key -days 36500`.
const V1_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBPzCB5QIUFLwzMvjCTfN/l7Z9QTqb5TxepZwwCgYIKoZIzj0EAwIwITEfMB0G
A1UEAwwWbGVnYWN5LnBhcnRuZXIuZXhhbXBsZTAgFw0yNjEyMDcwMzA1MzRaGA8y
MTI2MTExMzAzMDUzNFowITEfMB0GA1UEAwwWbGVnYWN5LnBhcnRuZXIuZXhhbXBs
ZTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMVm+OypfkJqW7520jTBKWUgSfSZ
jh3eWKDkaNeGCaQGcatCbniwypQz8v87k6yrWC7EgyWk6C//nghr+NlNfZ0wCgYI
KoZIzj0EAwIDSQAwRgIhAOfxCzwyxor2BOpgYqfUBVOJyiHSqTHfyXIl2WSPPRat
AiEAkFJC2NNUB29s43VhHbVnE4ajcGE2VwTIwYsgtSPwaEo=
-----END CERTIFICATE-----
";
const V1_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKgWKZsNsYAFVbGni
er23qGFwfFfzf7RWBdvTPl50bGyhRANCAATFZvjsqX5Calu+dtI0wSllIEn0mY4d
3lig5GjXhgmkBnGrQm54sMqUM/L/O5Osq1guxIMlpOgv/54Ia/jZTX2d
-----END PRIVATE KEY-----
";
/// `V1_KEY` encrypted: `openssl pkcs8 -topk8 -v2 aes256`.
const PKCS8_ENCRYPTED_KEY: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----
MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAjTGfg7MLIl9wICCAAw
DAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEBjK+CehOFLgYEyXxfSf07kEgZA1
rbyPOe4b+SpX1svl08nlX9c9DeG7opnx8JInjMVs1AIf9XC3Kzat6bz1qeuCxRIR
gXQhFM4NGdrgsKJW3erdid4Gq3Df68jpiuCJCtCtAoFyBNGgVPldpFkubofon02e
l7fMMQbGnALdIZoDsPCJobWnfdgdQ+Zf2KnyW6YBlJWYFRt+Rce/nBMKk/HEORg=
-----END ENCRYPTED PRIVATE KEY-----
";
/// `V1_KEY` encrypted the legacy way: `openssl ec -aes256`.
const LEGACY_ENCRYPTED_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
Proc-Type: 4,ENCRYPTED
DEK-Info: AES-256-CBC,430EEA7848C34C1F9B23087C98967D26

iBxq+aXSaKNoaDTufuTn9kJAuf527I/XahhXKKzRAIYzVG7YJSbaVo1mazripe2F
DlxpJgCXwlt4xHr4wc3EeTfDHAf7WVxJiQ/7EA/sXXyK92m0bIhpG4MjmGKjAqgY
3XgUx44QSQfech+c/5K0KSVJ4DBf4p2N2PZEn2mBfos=
-----END EC PRIVATE KEY-----
";

/// A listener's files: a CA, the server's chain (leaf, then CA) and
/// key, a partner's client certificate; bad files are added per case.
struct Pki {
    dir: tempfile::TempDir,
    ca: crate::demo::pki::Authority,
    server: crate::demo::pki::Issued,
    client: crate::demo::pki::Issued,
}

impl Pki {
    fn new() -> Self {
        use crate::demo::pki::{Authority, Leaf};
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Authority::new(dir.path(), "partner-ca");
        let server = ca.issue("server", &Leaf::server(&["gate.example"]));
        let client = ca.issue("client", &Leaf::client("partner-gateway"));
        Self { dir, ca, server, client }
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write");
        path
    }

    /// The PEM blocks of `path`.
    fn blocks(path: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(path).expect("read");
        let end = "-----END CERTIFICATE-----\n";
        text.split_inclusive(end).map(str::to_owned).collect()
    }

    /// A listener naming these files (`extra`: more keys, e.g. `crl`).
    fn listener(&self, cert: &Path, key: &Path, client_ca: &Path, extra: &str) -> ListenerConfig {
        let text = format!(
            "[filter]\ninterfaces = [\"eth0\"]\n[[listener]]\nname = \"edge\"\n\
             bind = \"0.0.0.0:8443\"\nbackend = \"127.0.0.1:8080\"\ncert = \"{}\"\n\
             key = \"{}\"\nclient_ca = \"{}\"\n{extra}\n",
            cert.display(),
            key.display(),
            client_ca.display()
        );
        let config = Config::parse(&text, Path::new("edgegate.toml"), &Overrides::default())
            .expect("config");
        config.listeners[0].clone()
    }

    /// The good files, with `client_ca` and `extra` as given.
    fn serving(&self, client_ca: &Path, extra: &str) -> ListenerConfig {
        self.listener(&self.server.cert, &self.server.key, client_ca, extra)
    }
}

/// Every bad file names its key, its path and the real cause (and not
/// a neighbour's key, nor Rust debug text); see issue 33.
#[test]
fn bad_files_are_refused_naming_key_path_and_cause() {
    let pki = Pki::new();
    let ca = &pki.ca.cert;
    let server_blocks = Pki::blocks(&pki.server.cert);
    let reversed: String = server_blocks.iter().rev().map(String::as_str).collect();
    let client_leaf = &Pki::blocks(&pki.client.cert)[0];
    let cut_short = &server_blocks[0][..server_blocks[0].len() - 30];
    type Case = (&'static str, ListenerConfig, PathBuf, &'static str, Vec<&'static str>);
    let case = |name, listener, path: &PathBuf, key, cause: &[&'static str]| -> Case {
        (name, listener, path.clone(), key, cause.to_vec())
    };
    let v1 = pki.write("legacy.pem", V1_CERT);
    let v1_key = pki.write("legacy.key", V1_KEY);
    let chain_ca_first = pki.write("ca-first.pem", &reversed);
    let pkcs8_encrypted = pki.write("pkcs8-encrypted.key", PKCS8_ENCRYPTED_KEY);
    let legacy_encrypted = pki.write("legacy-encrypted.key", LEGACY_ENCRYPTED_KEY);
    let garbage_crl = pki.write("garbage.crl", "this is not a CRL\n");
    let garbage_pem_crl =
        pki.write("garbage.crl.pem", "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n");
    let leaf_as_ca = pki.write("partner-leaf.pem", client_leaf);
    let truncated = pki.write("truncated.pem", cut_short);
    let crl = |path: &Path| format!("crl = [\"{}\"]", path.display());
    let cases = [
        case(
            "an X.509 v1 server certificate",
            pki.listener(&v1, &v1_key, ca, ""),
            &v1,
            "cert",
            &["`CN=legacy.partner.example`", "X.509 version 1", "only version 3", "-extfile"],
        ),
        case(
            "a chain in the wrong order (CA first)",
            pki.listener(&chain_ca_first, &pki.server.key, ca, ""),
            &chain_ca_first,
            "cert",
            &["out of order", "`key`", "number 2", "is a CA (CA:TRUE)", "first"],
        ),
        case(
            "a key for no certificate of the chain",
            pki.listener(&pki.server.cert, &pki.client.key, ca, ""),
            &pki.client.key,
            "key",
            &["does not belong to the certificate in `cert`"],
        ),
        case(
            "a PKCS#8 encrypted key",
            pki.listener(&v1, &pkcs8_encrypted, ca, ""),
            &pkcs8_encrypted,
            "key",
            &["encrypted with a passphrase", "openssl pkey -in", "600"],
        ),
        case(
            "a legacy (Proc-Type) encrypted key",
            pki.listener(&v1, &legacy_encrypted, ca, ""),
            &legacy_encrypted,
            "key",
            &["encrypted with a passphrase", "openssl pkey -in", "600"],
        ),
        case(
            "a certificate as the key",
            pki.listener(&pki.server.cert, ca, ca, ""),
            ca,
            "key",
            &["holds no private key"],
        ),
        case(
            "a garbage CRL",
            pki.serving(ca, &crl(&garbage_crl)),
            &garbage_crl,
            "crl",
            &["is no CRL", "does not parse", "give the CA's CRL"],
        ),
        case(
            "a PEM CRL block that is not a CRL",
            pki.serving(ca, &crl(&garbage_pem_crl)),
            &garbage_pem_crl,
            "crl",
            &["is no CRL", "does not parse"],
        ),
        case(
            "a certificate as the CRL",
            pki.serving(ca, &crl(ca)),
            ca,
            "crl",
            &["holds no CRL", "it has `CERTIFICATE`"],
        ),
        case(
            "a leaf (CA:FALSE) certificate as client_ca",
            pki.serving(&leaf_as_ca, ""),
            &leaf_as_ca,
            "client_ca",
            &["`CN=partner-gateway", "not a CA (CA:FALSE)", "the CA that issues", "partner-ca"],
        ),
        case(
            "a PEM block cut short",
            pki.listener(&truncated, &pki.server.key, ca, ""),
            &truncated,
            "cert",
            &["no `-----END CERTIFICATE-----` line", "cut short"],
        ),
        case(
            "a backend client chain in the wrong order",
            pki.serving(
                ca,
                &format!(
                    "[listener.backend_tls]\nca = \"{}\"\nserver_name = \"db\"\n\
                     cert = \"{}\"\nkey = \"{}\"",
                    ca.display(),
                    chain_ca_first.display(),
                    pki.server.key.display()
                ),
            ),
            &chain_ca_first,
            "backend_tls.cert",
            &["out of order", "`backend_tls.key`", "number 2"],
        ),
    ];
    for (name, listener, path, key, cause) in cases {
        let Err(error) = ListenerTls::load(&listener) else {
            panic!("{name}: loads");
        };
        let message = error.to_string();
        let named = format!("`{key}` {}", path.display());
        assert!(message.contains(&named), "{name}: no {named}: {message}");
        for words in cause {
            assert!(message.contains(words), "{name}: no {words:?}: {message}");
        }
        for wrong in ["Other(", "OtherError", "ParseError", "[45, 45"] {
            assert!(!message.contains(wrong), "{name}: debug text: {message}");
        }
        if key == "crl" {
            assert!(!message.contains("client_ca"), "{name}: blames client_ca: {message}");
        }
    }
}

/// What the refusals above must not catch: the good files, a version 1
/// root as `client_ca` (roots may predate version 3), and a pinned
/// self-signed client certificate, which webpki takes as its own anchor.
#[test]
fn good_files_and_legitimate_odd_ones_load() {
    let pki = Pki::new();
    let crl = pki.ca.crl("partner", &[]);
    let good = pki.serving(&pki.ca.cert, &format!("crl = [\"{}\"]", crl.display()));
    ListenerTls::load(&good).expect("the good files");

    let v1_root = pki.write("v1-root.pem", V1_CERT);
    ListenerTls::load(&pki.serving(&v1_root, "")).expect("a version 1 root as client_ca");

    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, "pinned-partner");
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let key = KeyPair::generate().expect("key");
    let pinned = params.self_signed(&key).expect("certificate");
    let path = pki.write("pinned.pem", pinned.pem());
    let tls = ListenerTls::load(&pki.serving(&path, "")).expect("a pinned client certificate");
    tls.recheck(Some(&[pinned.der().clone()])).expect("the pinned client is let in");
}
