//! A debuginfod client: debug files fetched by build-id, cached on disk.
//!
//! The cache keeps `CACHE/BUILDID/debuginfo` (the layout of elfutils' client) for files that
//! were found, and `CACHE/BUILDID/debuginfo.missing` for build-ids no server had, so a
//! missing debug file is asked for at most once per [`Debuginfod::negative_ttl`]. A
//! download is checked (an ELF file with the requested build-id and DWARF) before it is
//! renamed into place, so the cache only holds files that are whole and right.
//!
//! The cache is bounded: beyond [`Debuginfod::cache_limit_bytes`], the least recently used
//! files are removed. A server that failed (unreachable, timed out, 5xx) is not asked again
//! for [`Debuginfod::failure_ttl`]. Only `https://` servers are accepted unless plain
//! `http://` is allowed explicitly. In the daemon, fetches run
//! [in the background](Debuginfod::fetch_in_background), never on the kernel log reader's
//! path: an event whose debug file is still being fetched is reported at once without it.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;

use super::elf::{ElfFile, MAX_FILE_SIZE, hex};

/// Why no debug file came from debuginfod.
#[derive(Debug, Error)]
pub enum DebuginfodError {
    /// The build-id is not lowercase hex of a plausible length.
    #[error("build-id {0:?} is not hex")]
    BadBuildId(String),
    /// A server was asked recently and had nothing.
    #[error("no debuginfod server had build-id {0} when last asked (negative cache)")]
    KnownMissing(String),
    /// Every server answered 404 (or there is none).
    #[error("no debuginfod server has build-id {0}")]
    NotFound(String),
    /// A server could not be reached or failed.
    #[error("debuginfod {url}: {message}")]
    Server {
        /// The request.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The server sent a file that is not the debug file asked for.
    #[error("debuginfod {url} sent a file that is not the debug file of {build_id}")]
    WrongFile {
        /// The request.
        url: String,
        /// The build-id asked for.
        build_id: String,
    },
    /// The debug file is being fetched in the background; a later event will have it.
    #[error("the debug file of build-id {0} is being fetched from debuginfod")]
    Fetching(String),
    /// Every server failed recently and is not asked again yet.
    #[error("every debuginfod server failed within the last {0:?}; not asking again yet")]
    ServersFailing(Duration),
    /// A plain-http server was given without allowing it.
    #[error(
        "debuginfod server {0} is plain http: debug files steer what the agent reports, so only https is used unless --debuginfod-allow-http is given"
    )]
    InsecureUrl(String),
    /// A server URL is neither http nor https.
    #[error("debuginfod server {0} is not an http(s) URL")]
    BadUrl(String),
    /// The cache could not be written.
    #[error("debuginfod cache {path}: {source}")]
    Cache {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The most background fetches at a time; more build-ids wait for a later event.
const MAX_FETCHES: usize = 4;

/// A client of one or more debuginfod servers, with an on-disk cache.
pub struct Debuginfod {
    urls: Vec<String>,
    cache: PathBuf,
    agent: ureq::Agent,
    /// How long a build-id that no server had is not asked for again.
    pub negative_ttl: Duration,
    /// How long a server that failed is not asked again.
    pub failure_ttl: Duration,
    /// The most bytes of debug files the on-disk cache keeps.
    pub cache_limit_bytes: u64,
    background: bool,
    failed: Mutex<HashMap<String, Instant>>,
    fetching: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Debuginfod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Debuginfod")
            .field("urls", &self.urls)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Debuginfod {
    /// A client of `urls` (tried in order), caching under `cache`; each request gives up
    /// after `timeout`. `http://` URLs are refused unless `allow_http`.
    pub fn new(
        urls: Vec<String>,
        cache: PathBuf,
        timeout: Duration,
        allow_http: bool,
    ) -> Result<Debuginfod, DebuginfodError> {
        let urls: Vec<String> = urls
            .into_iter()
            .map(|u| u.trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        for url in &urls {
            let lower = url.to_ascii_lowercase();
            if lower.starts_with("http://") {
                if !allow_http {
                    return Err(DebuginfodError::InsecureUrl(url.clone()));
                }
            } else if !lower.starts_with("https://") {
                return Err(DebuginfodError::BadUrl(url.clone()));
            }
        }
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .user_agent("crashwatch-agent")
            .build()
            .new_agent();
        Ok(Debuginfod {
            urls,
            cache,
            agent,
            negative_ttl: Duration::from_secs(600),
            failure_ttl: Duration::from_secs(60),
            cache_limit_bytes: 1 << 30,
            background: false,
            failed: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashSet::new()),
        })
    }

    /// Makes [`Debuginfod::lookup`] fetch in background threads instead of blocking its
    /// caller (the daemon: the kernel log must never wait for a server).
    pub fn fetch_in_background(mut self) -> Debuginfod {
        self.background = true;
        self
    }

    /// The debug file of `build_id` from the cache; when it is not there, fetched now, or
    /// in the background ([`DebuginfodError::Fetching`]) when so configured.
    pub fn lookup(self: &Arc<Self>, build_id: &[u8]) -> Result<PathBuf, DebuginfodError> {
        if !self.background {
            return self.debuginfo(build_id);
        }
        let id = hex(build_id);
        if let Some(answer) = self.local_answer(build_id)? {
            return Ok(answer);
        }
        if self.urls.iter().all(|base| self.recently_failed(base)) {
            return Err(DebuginfodError::ServersFailing(self.failure_ttl));
        }
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        if fetching.contains(&id) || fetching.len() >= MAX_FETCHES {
            return Err(DebuginfodError::Fetching(id));
        }
        fetching.insert(id.clone());
        drop(fetching);
        let client = Arc::clone(self);
        let build_id = build_id.to_vec();
        let spawned = std::thread::Builder::new()
            .name("debuginfod".into())
            .spawn(move || {
                match client.debuginfo(&build_id) {
                    Ok(path) => tracing::info!(file = %path.display(), "fetched a debug file from debuginfod"),
                    Err(err) => tracing::info!(%err, "debuginfod fetch failed"),
                }
                client
                    .fetching
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&hex(&build_id));
            });
        if let Err(err) = spawned {
            self.fetching
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            tracing::warn!(%err, "cannot start a debuginfod fetch");
        }
        Err(DebuginfodError::Fetching(id))
    }

    /// Whether the debug file of `build_id` is being fetched in the background now.
    pub fn is_fetching(&self, build_id: &[u8]) -> bool {
        self.fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&hex(build_id))
    }

    /// What the cache says without asking a server: Some(file), None (ask), or an error
    /// (bad build-id, known missing).
    fn local_answer(&self, build_id: &[u8]) -> Result<Option<PathBuf>, DebuginfodError> {
        let id = hex(build_id);
        if !(2..=128).contains(&build_id.len()) {
            return Err(DebuginfodError::BadBuildId(id));
        }
        let dir = self.cache.join(&id);
        let cached = dir.join("debuginfo");
        if cached.is_file() {
            // Used now: the last to be evicted.
            if let Ok(file) = fs::File::options().write(true).open(&cached) {
                let _ = file.set_modified(SystemTime::now());
            }
            return Ok(Some(cached));
        }
        let missing = dir.join("debuginfo.missing");
        if let Ok(modified) = fs::metadata(&missing).and_then(|m| m.modified())
            && SystemTime::now()
                .duration_since(modified)
                .is_ok_and(|age| age < self.negative_ttl)
        {
            return Err(DebuginfodError::KnownMissing(id));
        }
        Ok(None)
    }

    fn recently_failed(&self, base: &str) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(base)
            .is_some_and(|at| at.elapsed() < self.failure_ttl)
    }

    fn record_failure(&self, base: &str, failed: bool) {
        let mut map = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed {
            map.insert(base.to_owned(), Instant::now());
        } else {
            map.remove(base);
        }
    }

    /// Removes the least recently used debug files until the cache holds at most
    /// [`Debuginfod::cache_limit_bytes`], never `keep`; also old negative-cache markers.
    fn evict(&self, keep: &Path) {
        let Ok(dirs) = fs::read_dir(&self.cache) else {
            return;
        };
        let mut files = Vec::new();
        for dir in dirs.flatten() {
            let dir = dir.path();
            let file = dir.join("debuginfo");
            if let Ok(meta) = fs::metadata(&file) {
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                files.push((used, meta.len(), file));
            }
            let missing = dir.join("debuginfo.missing");
            if fs::metadata(&missing)
                .and_then(|m| m.modified())
                .is_ok_and(|m| {
                    SystemTime::now()
                        .duration_since(m)
                        .is_ok_and(|age| age >= self.negative_ttl)
                })
            {
                let _ = fs::remove_file(&missing);
                let _ = fs::remove_dir(&dir); // only when empty
            }
        }
        let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
        files.sort();
        for (_, len, file) in files {
            if total <= self.cache_limit_bytes {
                break;
            }
            if file == keep {
                continue;
            }
            if fs::remove_file(&file).is_ok() {
                total -= len;
                if let Some(dir) = file.parent() {
                    let _ = fs::remove_dir(dir);
                }
                tracing::info!(file = %file.display(), "evicted from the debuginfod cache");
            }
        }
    }

    /// The servers of `DEBUGINFOD_URLS`-style text: URLs separated by spaces.
    pub fn parse_urls(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    /// The debug file of `build_id`: from the cache, or fetched now and cached.
    pub fn debuginfo(&self, build_id: &[u8]) -> Result<PathBuf, DebuginfodError> {
        if let Some(cached) = self.local_answer(build_id)? {
            return Ok(cached);
        }
        let id = hex(build_id);
        let dir = self.cache.join(&id);
        let cached = dir.join("debuginfo");
        let missing = dir.join("debuginfo.missing");
        let cache_error = |path: &Path| {
            let path = path.to_owned();
            move |source| DebuginfodError::Cache { path, source }
        };
        let mut last_error = None;
        let mut asked = false;
        for base in &self.urls {
            if self.recently_failed(base) {
                continue;
            }
            if !asked {
                fs::create_dir_all(&dir).map_err(cache_error(&dir))?;
                asked = true;
            }
            let url = format!("{base}/buildid/{id}/debuginfo");
            let result = self.download(&url, &dir, build_id);
            self.record_failure(base, matches!(result, Err(DebuginfodError::Server { .. })));
            match result {
                Ok(Some(temporary)) => {
                    fs::rename(&temporary, &cached).map_err(cache_error(&cached))?;
                    let _ = fs::remove_file(&missing);
                    self.evict(&cached);
                    return Ok(cached);
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(%err, "debuginfod request failed");
                    last_error = Some(err);
                }
            }
        }
        if !asked && !self.urls.is_empty() {
            return Err(DebuginfodError::ServersFailing(self.failure_ttl));
        }
        match last_error {
            // A server that failed may have the file: do not cache the miss.
            Some(err) => Err(err),
            None => {
                fs::create_dir_all(&dir).map_err(cache_error(&dir))?;
                fs::write(&missing, b"").map_err(cache_error(&missing))?;
                Err(DebuginfodError::NotFound(id))
            }
        }
    }

    /// Downloads `url` into a temporary file in `dir`; None on 404.
    fn download(
        &self,
        url: &str,
        dir: &Path,
        build_id: &[u8],
    ) -> Result<Option<PathBuf>, DebuginfodError> {
        let server = |message: String| DebuginfodError::Server {
            url: url.to_owned(),
            message,
        };
        let response = self
            .agent
            .get(url)
            .call()
            .map_err(|e| server(e.to_string()))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            status => return Err(server(format!("HTTP status {status}"))),
        }
        let temporary = dir.join(format!("debuginfo.part-{}", std::process::id()));
        let cache_error = |source| DebuginfodError::Cache {
            path: temporary.clone(),
            source,
        };
        let mut file = fs::File::create(&temporary).map_err(cache_error)?;
        let mut body = response.into_body();
        let mut reader = body.as_reader().take(MAX_FILE_SIZE + 1);
        let copied = std::io::copy(&mut reader, &mut file).map_err(|e| {
            let _ = fs::remove_file(&temporary);
            server(format!("reading the body: {e}"))
        })?;
        file.flush().map_err(cache_error)?;
        drop(file);
        let verified = copied <= MAX_FILE_SIZE
            && ElfFile::read(&temporary)
                .is_ok_and(|f| f.build_id.as_deref() == Some(build_id) && f.has_dwarf);
        if !verified {
            let _ = fs::remove_file(&temporary);
            return Err(DebuginfodError::WrongFile {
                url: url.to_owned(),
                build_id: hex(build_id),
            });
        }
        Ok(Some(temporary))
    }
}
