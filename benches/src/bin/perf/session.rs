//! One blkbackd under test: the sim directory, the backend process and the frontend driving it.

use super::*;

pub(crate) struct Session {
    pub(crate) _xenstored: sim::xenstored::SimXenstored,
    pub(crate) dom0: xen::xenstore::XenStore,
    pub(crate) spec: VbdSpec,
    pub(crate) backend: Child,
    pub(crate) front: Option<front::Front>,
    pub(crate) dir: PathBuf,
}

impl Session {
    /// `bin` serving `params` (an image's path, or an NBD URI) in configuration `c`; `tag`
    /// tells apart the directories of sessions that run at once (A and B).
    pub(crate) fn start(
        bin: &Path,
        work: &Path,
        params: &str,
        c: Config,
        tag: &str,
    ) -> anyhow::Result<Self> {
        let dir = work.join(format!("sim-{}{tag}", c.name.replace([' ', ',', '+'], "_")));
        let _ = std::fs::remove_dir_all(&dir);
        let xenstored = sim::xenstored::SimXenstored::start(sim::xenstored_dir(&dir))?;
        xenstored.introduce_domain(GUEST)?;
        let dom0 = xen::xenstore::XenStore::open_at(sim::xenstore_socket(&dir, 0))?;
        let spec = VbdSpec::disk(0, GUEST, DEVID, params);
        toolstack::create_vbd(&dom0, &spec)?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--platform")
            .arg(format!("sim:{}:0", dir.display()))
            .arg("--backend-path")
            .arg(spec.backend_path())
            .arg("--open-params")
            .arg("--max-queues")
            .arg(c.queues.to_string())
            .arg("--grant-mode")
            .arg(c.grant_mode)
            .arg("--stats-file")
            .arg(dir.join("stats"))
            .env_remove("BLKBACKD_RECORD")
            .stdin(Stdio::null());
        if let Some(us) = c.poll_us {
            cmd.arg("--poll-us").arg(us.to_string());
        }
        if c.sqpoll {
            cmd.arg("--sqpoll");
        }
        if !c.persistent {
            cmd.arg("--no-persistent");
        }
        let backend = cmd.spawn().context("starting blkbackd")?;
        let front = front::Front::connect(
            &dir,
            GUEST,
            &spec.frontend_path(),
            &spec.backend_path(),
            c.queues,
            c.persistent,
            32,
        )
        .context("handshake")?;
        Ok(Self {
            _xenstored: xenstored,
            dom0,
            spec,
            backend,
            front: Some(front),
            dir,
        })
    }

    /// `w` for `secs`; with `perf_stat`, its system calls counted by `perf stat` attached
    /// to the backend (which slows it: a run of its own, see `COUNT_SECONDS`).
    pub(crate) fn run(
        &mut self,
        w: Workload,
        secs: f64,
        image: u64,
        perf_stat: bool,
    ) -> anyhow::Result<Measured> {
        let pid = self.backend.id();
        let front = self.front.as_mut().context("closed")?;
        let queues = front.queues();
        let mut gen = Gen::new(w, image);
        let counter = perf_stat.then(|| SyscallCounter::start("-p", pid));
        let stat = format!("/proc/{pid}/stat");
        let cpu0 = cpu_ticks(&stat);
        let mut m = Measured::default();
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        let mut next_q = 0;
        let mut in_flight = 0;
        let mut failed = 0u64;
        loop {
            let mut queued = false;
            while in_flight < w.qd && Instant::now() < end {
                let q = (0..queues)
                    .map(|k| (next_q + k) % queues)
                    .find(|&q| front.can_submit(q, w.bs))
                    .context("no free slot")?;
                next_q = (q + 1) % queues;
                let (off, write) = gen.next();
                front.submit(q, off, w.bs, write)?;
                in_flight += 1;
                queued = true;
            }
            if queued {
                front.push()?;
            }
            if in_flight == 0 {
                break;
            }
            front.complete(|lat, ok| {
                in_flight -= 1;
                failed += u64::from(!ok);
                m.record(lat, w.bs);
            })?;
        }
        m.elapsed = t0.elapsed();
        m.cpu_ticks = cpu_ticks(&stat).zip(cpu0).map(|(a, b)| a - b);
        m.syscalls = counter.and_then(SyscallCounter::stop);
        if failed > 0 {
            bail!("{failed} requests failed");
        }
        Ok(m)
    }

    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        toolstack::request_removal(&self.dom0, &self.spec)?;
        if let Some(f) = self.front.take() {
            f.close()?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.backend.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.backend.kill();
                bail!("blkbackd did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}
