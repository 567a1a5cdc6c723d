//! Lesson: fetch the status code of several URLs at once (Python's custom `Thread` subclass
//! that fetches a URL). The example serves the URLs itself on 127.0.0.1: no outside network.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use parjob::{Backend, Parallel, delayed};

/// Starts a tiny HTTP server on an ephemeral port of 127.0.0.1 and returns its address.
/// It answers `/status/<code>` with that code, after `?delay=<ms>` milliseconds if given.
pub fn start_server() -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?.to_string();
    std::thread::Builder::new()
        .name("http-server".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // One thread per connection, so slow answers do not hold up the others.
                std::thread::spawn(move || serve(stream));
            }
        })?;
    Ok(address)
}

fn serve(stream: TcpStream) {
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    let code: u16 = route
        .strip_prefix("/status/")
        .and_then(|c| c.parse().ok())
        .unwrap_or(404);
    if let Some(ms) = query.strip_prefix("delay=").and_then(|ms| ms.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let body = format!("status {code}\n");
    let answer = format!(
        "HTTP/1.0 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = (&stream).write_all(answer.as_bytes());
}

/// GETs `url` (`http://host:port/path`) and returns its status code, or why it failed.
fn fetch_status(url: String) -> Result<u16, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or(format!("{url}: not an http:// URL"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = TcpStream::connect(host).map_err(|e| format!("{url}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| format!("{url}: {e}"))?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")
        .map_err(|e| format!("{url}: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("{url}: {e}"))?;
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or(format!("{url}: not an HTTP answer"))
}

/// A URL and what fetching it gave: a status code, or why there is none.
pub type Fetched = (String, Result<u16, String>);

/// Runs the lesson; returns each URL with its outcome.
pub fn run(backend: Backend) -> Result<Vec<Fetched>, parjob::Error> {
    super::banner("HTTP status codes from a local server", backend);
    let address = start_server().map_err(|e| {
        parjob::Error::InvalidConfig(format!("cannot start the local HTTP server: {e}"))
    })?;
    let urls: Vec<String> = [
        "status/200?delay=300",
        "status/404?delay=300",
        "status/500?delay=300",
        "status/418?delay=300",
        "status/301?delay=300",
    ]
    .iter()
    .map(|path| format!("http://{address}/{path}"))
    .chain(["http://127.0.0.1:1/unreachable".to_string()])
    .collect();
    let began = Instant::now();
    let statuses = Parallel::new(urls.len() as i32)
        .backend(backend)
        .run(urls.iter().map(|url| delayed(fetch_status, url.clone())))?;
    for (url, status) in urls.iter().zip(&statuses) {
        match status {
            Ok(code) => println!("{code}  {url}"),
            Err(why) => println!("---  {why}"),
        }
    }
    println!(
        "{} URLs, each answered after 300 ms, fetched in {:.2} s",
        urls.len(),
        began.elapsed().as_secs_f64()
    );
    Ok(urls.into_iter().zip(statuses).collect())
}
