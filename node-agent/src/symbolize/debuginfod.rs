//! A debuginfod client: debug files fetched by build-id, cached on disk.
//!
//! The cache keeps `CACHE/BUILDID/debuginfo` (the layout of elfutils' client) for files that
//! were found, and `CACHE/BUILDID/debuginfo.missing` for build-ids no server had, so a
//! missing debug file is asked for at most once per [`Debuginfod::negative_ttl`]. A
//! download is checked (an ELF file with the requested build-id and DWARF) before it is
//! renamed into place, so the cache only holds files that are whole and right.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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
    /// The cache could not be written.
    #[error("debuginfod cache {path}: {source}")]
    Cache {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A client of one or more debuginfod servers, with an on-disk cache.
pub struct Debuginfod {
    urls: Vec<String>,
    cache: PathBuf,
    agent: ureq::Agent,
    /// How long a build-id that no server had is not asked for again.
    pub negative_ttl: Duration,
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
    /// after `timeout`.
    pub fn new(urls: Vec<String>, cache: PathBuf, timeout: Duration) -> Debuginfod {
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .user_agent("crashwatch-agent")
            .build()
            .new_agent();
        Debuginfod {
            urls: urls
                .into_iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .filter(|u| !u.is_empty())
                .collect(),
            cache,
            agent,
            negative_ttl: Duration::from_secs(600),
        }
    }

    /// The servers of `DEBUGINFOD_URLS`-style text: URLs separated by spaces.
    pub fn parse_urls(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    /// The debug file of `build_id`: from the cache, or fetched and cached.
    pub fn debuginfo(&self, build_id: &[u8]) -> Result<PathBuf, DebuginfodError> {
        let id = hex(build_id);
        if !(2..=128).contains(&build_id.len()) {
            return Err(DebuginfodError::BadBuildId(id));
        }
        let dir = self.cache.join(&id);
        let cached = dir.join("debuginfo");
        if cached.is_file() {
            return Ok(cached);
        }
        let missing = dir.join("debuginfo.missing");
        if let Ok(modified) = fs::metadata(&missing).and_then(|m| m.modified())
            && SystemTime::now()
                .duration_since(modified)
                .is_ok_and(|age| age < self.negative_ttl)
        {
            return Err(DebuginfodError::KnownMissing(id));
        }
        let cache_error = |path: &Path| {
            let path = path.to_owned();
            move |source| DebuginfodError::Cache { path, source }
        };
        fs::create_dir_all(&dir).map_err(cache_error(&dir))?;
        let mut last_error = None;
        for base in &self.urls {
            let url = format!("{base}/buildid/{id}/debuginfo");
            match self.download(&url, &dir, build_id) {
                Ok(Some(temporary)) => {
                    fs::rename(&temporary, &cached).map_err(cache_error(&cached))?;
                    let _ = fs::remove_file(&missing);
                    return Ok(cached);
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(%err, "debuginfod request failed");
                    last_error = Some(err);
                }
            }
        }
        match last_error {
            // A server that failed may have the file: do not cache the miss.
            Some(err) => Err(err),
            None => {
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
