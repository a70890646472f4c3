//! Job authentication: every TCP connection opens with a mutual
//! challenge-response keyed by the job's secret token, before any frame.
//!
//! ```text
//! client -> server  "PSAUTH01" | nonce_c (32 random bytes)
//! server -> client  "PSAUTH01" | nonce_s | HMAC-SHA256(token, "pserver server" | nonce_c | nonce_s)
//! client -> server  HMAC-SHA256(token, "pserver client" | nonce_s | nonce_c)
//! ```
//! Each side proves it knows the token over the other side's fresh nonce,
//! so a recorded handshake cannot be replayed, and MACs are compared in
//! constant time. A peer that fails, or is too slow, is disconnected before
//! it can send a single frame. Traffic is authenticated, not encrypted.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"PSAUTH01";
const NONCE: usize = 32;
const MAC: usize = 32;

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
        if s.len() < 32 || !s.len().is_multiple_of(2) {
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
        Token::from_hex(&text)
    }

    /// The job's token from `PSERVER_TOKEN` or `PSERVER_TOKEN_FILE`; `None`
    /// when neither is set.
    pub fn from_env() -> Result<Option<Token>> {
        if let Ok(hex) = std::env::var("PSERVER_TOKEN")
            && !hex.is_empty()
        {
            return Token::from_hex(&hex).map(Some);
        }
        match std::env::var_os("PSERVER_TOKEN_FILE") {
            Some(p) if !p.is_empty() => Token::from_file(Path::new(&p)).map(Some),
            _ => Ok(None),
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

fn nonce() -> Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(|e| Error::Config(format!("no randomness for a nonce: {e}")))?;
    Ok(n)
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::io(format!("authentication: {what}"), e)
}

fn refused(detail: &str) -> Error {
    Error::Remote { peer: "authentication".into(), message: detail.into() }
}

/// The connecting side.
pub fn client(stream: &mut TcpStream, token: &Token) -> Result<()> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| io("socket", e))?;
    let nc = nonce()?;
    let mut hello = Vec::with_capacity(8 + NONCE);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&nc);
    stream.write_all(&hello).map_err(|e| io("sending the challenge", e))?;
    let mut reply = [0u8; 8 + NONCE + MAC];
    stream.read_exact(&mut reply).map_err(|e| io("the server did not answer the challenge (wrong token?)", e))?;
    if &reply[..8] != MAGIC {
        return Err(refused("the peer does not speak pserver's handshake"));
    }
    let ns = &reply[8..8 + NONCE];
    token
        .mac(b"pserver server", &nc, ns)
        .verify_slice(&reply[8 + NONCE..])
        .map_err(|_| refused("the server does not know the job token"))?;
    let proof = token.mac(b"pserver client", ns, &nc).finalize().into_bytes();
    stream.write_all(&proof).map_err(|e| io("sending the proof", e))?;
    stream.set_read_timeout(None).map_err(|e| io("socket", e))?;
    Ok(())
}

/// The accepting side.
pub fn server(stream: &mut TcpStream, token: &Token) -> Result<()> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| io("socket", e))?;
    let mut hello = [0u8; 8 + NONCE];
    stream.read_exact(&mut hello).map_err(|e| io("no challenge from the peer", e))?;
    if &hello[..8] != MAGIC {
        return Err(refused("the peer does not speak pserver's handshake"));
    }
    let nc = &hello[8..];
    let ns = nonce()?;
    let mut reply = Vec::with_capacity(8 + NONCE + MAC);
    reply.extend_from_slice(MAGIC);
    reply.extend_from_slice(&ns);
    reply.extend_from_slice(&token.mac(b"pserver server", nc, &ns).finalize().into_bytes());
    stream.write_all(&reply).map_err(|e| io("answering the challenge", e))?;
    let mut proof = [0u8; MAC];
    stream.read_exact(&mut proof).map_err(|e| io("no proof from the peer", e))?;
    token
        .mac(b"pserver client", &ns, nc)
        .verify_slice(&proof)
        .map_err(|_| refused("the peer does not know the job token"))?;
    stream.set_read_timeout(None).map_err(|e| io("socket", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(a: Token, b: Token) -> (Result<()>, Result<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            server(&mut s, &b)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let r = client(&mut c, &a);
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
        assert!(c.is_err());
        assert!(s.is_err());
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
            let (mut s, _) = l.accept().unwrap();
            let first = server(&mut s, &tt);
            let (mut s2, _) = l.accept().unwrap();
            (first, server(&mut s2, &tt))
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
        // The replay: same hello, same proof, on a new connection.
        let mut c2 = TcpStream::connect(addr).unwrap();
        c2.write_all(&hello).unwrap();
        let mut reply2 = [0u8; 8 + NONCE + MAC];
        c2.read_exact(&mut reply2).unwrap();
        c2.write_all(&proof).unwrap();
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
