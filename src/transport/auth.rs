//! Job authentication: every TCP connection opens with a mutual
//! challenge-response keyed by the job's secret token, before any frame.
//!
//! ```text
//! client -> server  "PSAUTH01" | nonce_c (32 random bytes)
//! server -> client  "PSAUTH01" | nonce_s | HMAC-SHA256(token, "pserver server" | nonce_c | nonce_s)
//! client -> server  HMAC-SHA256(token, "pserver client" | nonce_s | nonce_c)
//! server -> client  "PSAUTHOK", or "PSREFUSE" | u16 length | UTF-8 reason
//! ```
//! Each side proves it knows the token over the other side's fresh nonce,
//! so a recorded handshake cannot be replayed, and MACs are compared in
//! constant time. The verdict lets a client that was refused (wrong token,
//! or the node is at its connection limit) say why instead of seeing a bare
//! EOF. A peer that fails, or does not finish within [`HANDSHAKE_TIMEOUT`]
//! (a deadline for the whole handshake, not per read), is disconnected before
//! it can send a single frame. Traffic is authenticated, not encrypted.
//!
//! This module owns the token and the handshake bytes; it never sees a
//! frame. The TCP transport runs it on every connection it makes or accepts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"PSAUTH01";
const VERDICT_OK: &[u8; 8] = b"PSAUTHOK";
const VERDICT_REFUSED: &[u8; 8] = b"PSREFUSE";
const NONCE: usize = 32;
const MAC: usize = 32;
/// Longest refusal reason sent or accepted.
const MAX_REASON: usize = 1024;

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A job's secret.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<secret>)")
    }
}

impl Token {
    /// 32 random bytes.
    pub fn generate() -> Result<Token> {
        let mut b = vec![0u8; 32];
        getrandom::fill(&mut b).map_err(|e| Error::Config(format!("no randomness for a token: {e}")))?;
        Ok(Token(b))
    }

    /// From hex (at least 16 bytes, i.e. 32 hex digits).
    pub fn from_hex(s: &str) -> Result<Token> {
        let s = s.trim();
        let bad = || Error::Config("the job token must be at least 32 hex digits".into());
        if s.len() < 32 || !s.len().is_multiple_of(2) || !s.is_ascii() {
            return Err(bad());
        }
        let bytes = (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| bad()));
        Ok(Token(bytes.collect::<Result<_>>()?))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// From a file that only its owner may read (mode 0600 or stricter).
    pub fn from_file(path: &Path) -> Result<Token> {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io(format!("reading token file {}", path.display()), e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::Config(format!(
                "token file {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading token file {}", path.display()), e))?;
        Token::from_hex(&text).map_err(|e| Error::Config(format!("token file {}: {e}", path.display())))
    }

    /// The job's token from `PSERVER_TOKEN` or `PSERVER_TOKEN_FILE`; `None`
    /// when neither is set.
    pub fn from_env() -> Result<Option<Token>> {
        Token::from_env_or_file(None)
    }

    /// `PSERVER_TOKEN` (hex) when set, else the file `file` (or, when that
    /// is `None`, `PSERVER_TOKEN_FILE`); `None` when there is neither.
    pub fn from_env_or_file(file: Option<&Path>) -> Result<Option<Token>> {
        if let Ok(hex) = std::env::var("PSERVER_TOKEN")
            && !hex.is_empty()
        {
            return Token::from_hex(&hex).map(Some).map_err(|e| Error::Config(format!("PSERVER_TOKEN: {e}")));
        }
        let from_env = std::env::var_os("PSERVER_TOKEN_FILE").filter(|p| !p.is_empty());
        match file.map(Path::to_path_buf).or(from_env.map(Into::into)) {
            Some(p) => Token::from_file(&p).map(Some),
            None => Ok(None),
        }
    }

    fn mac(&self, label: &[u8], a: &[u8], b: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        m.update(label);
        m.update(a);
        m.update(b);
        m
    }
}

/// Whether a node authenticates its connections.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Every connection proves knowledge of this token, both ways.
    Token(Token),
    /// No handshake at all (`--insecure`): anyone who reaches the port is in.
    Insecure,
}

/// What a node tells the user who started it without a token.
pub const NO_TOKEN: &str = "no job token: set PSERVER_TOKEN (hex) or --token-file FILE (PSERVER_TOKEN_FILE, \
     a file only you can read), as tools/launch does; or pass --insecure (PSERVER_INSECURE=1) to accept \
     unauthenticated connections on a network you trust";

impl Auth {
    /// The token from `PSERVER_TOKEN`, `file` or `PSERVER_TOKEN_FILE`; without
    /// one, `Insecure` when `insecure` allows it (logged), else an error
    /// saying how to provide one. A token given with `insecure` is still used.
    pub fn resolve(file: Option<&Path>, insecure: bool) -> Result<Auth> {
        match Token::from_env_or_file(file)? {
            Some(t) => Ok(Auth::Token(t)),
            None if insecure => {
                tracing::warn!("running without a job token (--insecure): connections are not authenticated");
                Ok(Auth::Insecure)
            }
            None => Err(Error::Config(NO_TOKEN.into())),
        }
    }

    /// From the environment alone (`PSERVER_TOKEN`, `PSERVER_TOKEN_FILE`,
    /// `PSERVER_INSECURE=1`).
    pub fn from_env() -> Result<Auth> {
        let insecure = std::env::var("PSERVER_INSECURE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
        Auth::resolve(None, insecure)
    }

    /// A fresh random token, for jobs whose nodes all live in this process.
    pub fn generate() -> Result<Auth> {
        Token::generate().map(Auth::Token)
    }
}

fn nonce() -> Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(|e| Error::Config(format!("no randomness for a nonce: {e}")))?;
    Ok(n)
}

fn peer_of(stream: &TcpStream) -> String {
    stream.peer_addr().map_or_else(|_| "an unknown peer".into(), |a| a.to_string())
}

fn failed(stream: &TcpStream, detail: impl Into<String>) -> Error {
    Error::Unauthenticated { peer: peer_of(stream), detail: detail.into() }
}

/// Reads exactly `buf.len()` bytes before `deadline`.
fn read_by(mut stream: &TcpStream, buf: &mut [u8], deadline: Instant, what: &str) -> Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(failed(stream, format!("{what}: nothing within the handshake's deadline")));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| Error::io("authentication: socket", e))?;
        match stream.read(&mut buf[at..]) {
            Ok(0) => return Err(failed(stream, format!("{what}: the peer closed the connection"))),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(failed(stream, format!("{what}: nothing within the handshake's deadline")));
            }
            Err(e) => return Err(failed(stream, format!("{what}: {e}"))),
        }
    }
    Ok(())
}

fn write_by(mut stream: &TcpStream, bytes: &[u8], what: &str) -> Result<()> {
    stream.write_all(bytes).map_err(|e| failed(stream, format!("{what}: {e}")))
}

fn start(stream: &TcpStream) -> Result<Instant> {
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| Error::io("authentication: socket", e))?;
    Ok(Instant::now() + HANDSHAKE_TIMEOUT)
}

fn done(stream: &TcpStream) -> Result<()> {
    stream.set_read_timeout(None).map_err(|e| Error::io("authentication: socket", e))?;
    stream.set_write_timeout(None).map_err(|e| Error::io("authentication: socket", e))
}

/// The connecting side: proves the token, checks the server's proof, and
/// returns once the server admitted the connection.
pub fn client(stream: &TcpStream, token: &Token) -> Result<()> {
    let deadline = start(stream)?;
    let nc = nonce()?;
    let mut hello = Vec::with_capacity(8 + NONCE);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&nc);
    write_by(stream, &hello, "sending the challenge")?;
    let mut reply = [0u8; 8 + NONCE + MAC];
    read_by(stream, &mut reply, deadline, "waiting for the server's proof")?;
    if &reply[..8] != MAGIC {
        return Err(failed(stream, "the peer does not speak pserver's handshake (does it run with --insecure?)"));
    }
    let ns = &reply[8..8 + NONCE];
    token
        .mac(b"pserver server", &nc, ns)
        .verify_slice(&reply[8 + NONCE..])
        .map_err(|_| failed(stream, "the server does not know the job token (is PSERVER_TOKEN the job's?)"))?;
    let proof = token.mac(b"pserver client", ns, &nc).finalize().into_bytes();
    write_by(stream, &proof, "sending the proof")?;
    let mut verdict = [0u8; 8];
    read_by(stream, &mut verdict, deadline, "waiting for the verdict")?;
    if &verdict == VERDICT_OK {
        return done(stream);
    }
    if &verdict != VERDICT_REFUSED {
        return Err(failed(stream, "malformed verdict"));
    }
    let mut len = [0u8; 2];
    read_by(stream, &mut len, deadline, "reading the refusal")?;
    let mut reason = vec![0u8; usize::from(u16::from_le_bytes(len)).min(MAX_REASON)];
    read_by(stream, &mut reason, deadline, "reading the refusal")?;
    Err(failed(stream, format!("refused by the server: {}", String::from_utf8_lossy(&reason))))
}

/// The accepting side. Once the peer has proven the token, `admit` decides
/// whether the connection may stay (for example under a connection limit);
/// its `Err` reason is sent to the peer, and returned as
/// [`Error::LimitExceeded`]; any other error means the peer failed.
pub fn server(stream: &TcpStream, token: &Token, admit: impl FnOnce() -> Result<(), String>) -> Result<()> {
    server_within(stream, token, admit, HANDSHAKE_TIMEOUT)
}

fn server_within(
    stream: &TcpStream,
    token: &Token,
    admit: impl FnOnce() -> Result<(), String>,
    timeout: Duration,
) -> Result<()> {
    start(stream)?;
    let deadline = Instant::now() + timeout;
    let mut hello = [0u8; 8 + NONCE];
    read_by(stream, &mut hello, deadline, "waiting for the challenge")?;
    if &hello[..8] != MAGIC {
        return Err(failed(stream, "the peer does not speak pserver's handshake (not a pserver node, or --insecure)"));
    }
    let nc = &hello[8..];
    let ns = nonce()?;
    let mut reply = Vec::with_capacity(8 + NONCE + MAC);
    reply.extend_from_slice(MAGIC);
    reply.extend_from_slice(&ns);
    reply.extend_from_slice(&token.mac(b"pserver server", nc, &ns).finalize().into_bytes());
    write_by(stream, &reply, "answering the challenge")?;
    let mut proof = [0u8; MAC];
    read_by(stream, &mut proof, deadline, "waiting for the peer's proof")?;
    if token.mac(b"pserver client", &ns, nc).verify_slice(&proof).is_err() {
        let _ = refuse(stream, "wrong job token");
        return Err(failed(stream, "the peer does not know the job token"));
    }
    if let Err(reason) = admit() {
        let _ = refuse(stream, &reason);
        return Err(Error::LimitExceeded(format!("{} (authenticated, refused)", reason)));
    }
    write_by(stream, VERDICT_OK, "sending the verdict")?;
    done(stream)
}

fn refuse(stream: &TcpStream, reason: &str) -> Result<()> {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut msg = VERDICT_REFUSED.to_vec();
    msg.extend_from_slice(&(end as u16).to_le_bytes());
    msg.extend_from_slice(&reason.as_bytes()[..end]);
    write_by(stream, &msg, "sending the refusal")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(a: Token, b: Token) -> (Result<()>, Result<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            server(&s, &b, || Ok(()))
        });
        let c = TcpStream::connect(addr).unwrap();
        let r = client(&c, &a);
        drop(c);
        (r, t.join().unwrap())
    }

    #[test]
    fn same_token_authenticates_both_ways() {
        let t = Token::generate().unwrap();
        let (c, s) = pair(t.clone(), t);
        assert!(c.is_ok() && s.is_ok());
    }

    #[test]
    fn a_wrong_token_fails_on_both_sides() {
        let (c, s) = pair(Token::generate().unwrap(), Token::generate().unwrap());
        assert!(c.unwrap_err().to_string().contains("does not know the job token"));
        assert!(s.is_err());
    }

    #[test]
    fn a_refusal_after_authentication_reaches_the_client_with_its_reason() {
        let t = Token::generate().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let tt = t.clone();
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            server(&s, &tt, || Err("connection limit of 3 reached".into()))
        });
        let c = TcpStream::connect(addr).unwrap();
        let e = client(&c, &t).unwrap_err().to_string();
        assert!(e.contains("connection limit of 3 reached"), "{e}");
        assert!(srv.join().unwrap().is_err());
    }

    #[test]
    fn a_silent_or_foreign_peer_is_dropped_by_the_deadline() {
        let t = Token::generate().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let mut out = Vec::new();
            for _ in 0..2 {
                let (s, _) = l.accept().unwrap();
                let t0 = Instant::now();
                out.push((server_within(&s, &t, || Ok(()), Duration::from_millis(300)), t0.elapsed()));
            }
            out
        });
        // A peer that connects and says nothing, then one that trickles
        // a valid-looking hello too slowly to finish.
        let silent = TcpStream::connect(addr).unwrap();
        let mut slow = TcpStream::connect(addr).unwrap();
        let _ = slow.write_all(&MAGIC[..4]);
        let results = srv.join().unwrap();
        for (r, took) in results {
            assert!(r.unwrap_err().to_string().contains("deadline"));
            assert!(took < Duration::from_secs(60));
        }
        drop((silent, slow));
    }

    #[test]
    fn a_frame_instead_of_a_handshake_is_refused() {
        let t = Token::generate().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            server(&s, &t, || Ok(()))
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let f = crate::transport::frame::encode(&crate::transport::Frame::new(1, 1, bytes::Bytes::from(vec![0u8; 64])));
        c.write_all(&f).unwrap();
        assert!(srv.join().unwrap().unwrap_err().to_string().contains("does not speak"));
    }

    #[test]
    fn a_replayed_proof_is_refused() {
        // Record a good client's proof, then replay its whole transcript to
        // a new server: the server's fresh nonce makes the old proof wrong.
        let t = Token::generate().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let tt = t.clone();
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let first = server(&s, &tt, || Ok(()));
            let (s2, _) = l.accept().unwrap();
            (first, server(&s2, &tt, || Ok(())))
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let nc = [7u8; NONCE];
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&nc);
        c.write_all(&hello).unwrap();
        let mut reply = [0u8; 8 + NONCE + MAC];
        c.read_exact(&mut reply).unwrap();
        let proof = t.mac(b"pserver client", &reply[8..8 + NONCE], &nc).finalize().into_bytes();
        c.write_all(&proof).unwrap();
        let mut verdict = [0u8; 8];
        c.read_exact(&mut verdict).unwrap();
        assert_eq!(&verdict, VERDICT_OK);
        // The replay: same hello, same proof, on a new connection.
        let mut c2 = TcpStream::connect(addr).unwrap();
        c2.write_all(&hello).unwrap();
        let mut reply2 = [0u8; 8 + NONCE + MAC];
        c2.read_exact(&mut reply2).unwrap();
        c2.write_all(&proof).unwrap();
        let mut verdict2 = [0u8; 8];
        c2.read_exact(&mut verdict2).unwrap();
        assert_eq!(&verdict2, VERDICT_REFUSED);
        let (first, second) = srv.join().unwrap();
        assert!(first.is_ok());
        assert!(second.is_err(), "a replayed handshake was accepted");
    }

    #[test]
    fn tokens_parse_from_hex_and_refuse_short_or_bad_ones() {
        let t = Token::generate().unwrap();
        assert_eq!(Token::from_hex(&t.to_hex()).unwrap().0, t.0);
        assert!(Token::from_hex("abcd").is_err());
        assert!(Token::from_hex(&"zz".repeat(20)).is_err());
        assert!(Token::from_hex(&"é".repeat(20)).is_err(), "non-ASCII is an error, not a panic");
        assert_eq!(format!("{t:?}"), "Token(<secret>)");
    }

    #[test]
    fn a_token_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("pserver-token-{}", std::process::id()));
        std::fs::write(&p, Token::generate().unwrap().to_hex()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Token::from_file(&p).unwrap_err().to_string().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Token::from_file(&p).is_ok());
        std::fs::remove_file(&p).unwrap();
    }
}
