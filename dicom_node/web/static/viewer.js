// The job page's viewer: NiiVue (bundled, niivue-0.69.0.umd.js) showing the MR resampled onto the sCT
// grid, the sCT and (if any) the uncertainty side by side, with linked crosshairs and slices, the
// three planes, window presets for the sCT and an overlay of the sCT on the MR. Nothing is fetched
// from anywhere but this node.
(function () {
  "use strict";
  const root = document.getElementById("viewer");
  if (!root || !window.niivue) return;
  const { Niivue, SLICE_TYPE } = window.niivue;
  const started = performance.now();
  const WINDOWS = { soft: [-160, 240], bone: [-500, 1300], lung: [-1350, 150] }; // W/L 400/40, 1800/400, 1500/-600
  const panes = [];
  for (const canvas of root.querySelectorAll("canvas[data-url]")) {
    const nv = new Niivue({ backColor: [0, 0, 0, 1], crosshairColor: [1, 0.8, 0, 0.8], crosshairWidth: 1, show3Dcrosshair: false,
                            isResizeCanvas: true, loadingText: "loading…", dragAndDropEnabled: false });
    nv.attachToCanvas(canvas);
    panes.push({ nv, kind: canvas.dataset.kind, url: canvas.dataset.url });
  }
  const byKind = (kind) => panes.find((p) => p.kind === kind);
  const status = document.getElementById("viewer-status");

  function setWindow(pane, low, high) {
    const volume = pane.nv.volumes[0];
    volume.cal_min = low;
    volume.cal_max = high;
    pane.nv.updateGLVolume();
  }

  async function load() {
    await Promise.all(panes.map((p) => p.nv.loadVolumes([{
      url: p.url, name: `${p.kind}.nii`, colormap: p.kind === "std" ? "inferno" : "gray",
      cal_min: p.kind === "sct" ? WINDOWS.soft[0] : undefined, cal_max: p.kind === "sct" ? WINDOWS.soft[1] : undefined,
    }])));
    for (const p of panes) {
      p.mrWindow = [p.nv.volumes[0].cal_min, p.nv.volumes[0].cal_max];
      p.nv.syncWith(panes.filter((o) => o !== p).map((o) => o.nv), { "2d": true, "3d": true });
      p.nv.setSliceType(SLICE_TYPE.AXIAL);
    }
    if (byKind("sct")) setWindow(byKind("sct"), ...WINDOWS.soft);
    const milliseconds = performance.now() - started;
    root.dataset.loadedMs = String(Math.round(milliseconds));
    root.dataset.readyAtMs = String(Math.round(performance.now())); // since the navigation started
    root.dataset.ready = "true";
    if (status) status.textContent = `loaded in ${(milliseconds / 1000).toFixed(1)} s`;
  }

  root.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const { action, value } = button.dataset;
    if (action === "plane") {
      for (const p of panes) p.nv.setSliceType(SLICE_TYPE[value]);
    } else if (action === "window" && byKind("sct")) {
      setWindow(byKind("sct"), ...WINDOWS[value]);
    } else if (action === "mr-window" && byKind("mr")) {
      setWindow(byKind("mr"), ...byKind("mr").mrWindow);
    } else if (action === "overlay" && byKind("mr") && byKind("sct")) {
      const mr = byKind("mr").nv;
      if (mr.volumes.length < 2) {
        await mr.addVolumeFromUrl({ url: byKind("sct").url, name: "sct-overlay.nii", colormap: "warm", opacity: 0.4,
                                    cal_min: 200, cal_max: 1500 });
        button.textContent = "Overlay off";
      } else {
        mr.removeVolumeByIndex(1);
        button.textContent = "sCT bone on MR";
      }
    }
    for (const b of root.querySelectorAll(`button[data-action="${action}"]`)) b.classList.toggle("on", b === button);
  });

  load().catch((error) => {
    root.dataset.ready = "error";
    if (status) status.textContent = `the volumes could not be shown: ${error}`;
  });
})();
