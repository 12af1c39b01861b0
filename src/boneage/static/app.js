// boneage page: send the form to /api/v1/predict and show the result. No framework, no CDN; all text goes
// through textContent so nothing from a file name or a server message can become markup.
"use strict";

(function () {
  const API = "/api/v1";
  const $ = (id) => document.getElementById(id);
  const form = $("predict-form");
  const input = $("image");
  const dropzone = $("dropzone");
  const submit = $("submit");
  let maxBytes = 20 * 1024 * 1024;
  let previewUrl = null;

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function setStatus(message) {
    $("status").textContent = message || "";
  }

  function signed(value, digits) {
    const text = Math.abs(value).toFixed(digits);
    return (value > 0 ? "+" : value < 0 ? "−" : "±") + text;
  }

  function monthsToText(months) {
    const total = Math.round(Math.abs(months));
    return Math.floor(total / 12) + " y " + (total % 12) + " m";
  }

  // ---- file choice and preview ------------------------------------------------------------------------
  function showPreview(file) {
    const img = $("preview-img");
    if (previewUrl) {
      URL.revokeObjectURL(previewUrl);
      previewUrl = null;
    }
    if (!file) {
      $("preview").hidden = true;
      return;
    }
    const isBrowserImage = /^image\/(png|jpeg)$/.test(file.type) || /\.(png|jpe?g)$/i.test(file.name);
    const size = (file.size / (1024 * 1024)).toFixed(2) + " MB";
    if (isBrowserImage) {
      previewUrl = URL.createObjectURL(file);
      img.src = previewUrl;
      img.hidden = false;
      $("preview-name").textContent = file.name + " (" + size + ")";
    } else {
      img.removeAttribute("src");
      img.hidden = true;
      $("preview-name").textContent =
        file.name + " (" + size + ") — no preview for DICOM; sex and age may come from its header";
    }
    $("preview").hidden = false;
  }

  function chosenFile() {
    return input.files && input.files.length ? input.files[0] : null;
  }

  input.addEventListener("change", () => {
    showError("");
    const file = chosenFile();
    showPreview(file);
    if (file && file.size > maxBytes) {
      showError("This file is larger than the " + (maxBytes / 1048576) + " MB upload limit.");
    }
  });

  ["dragenter", "dragover"].forEach((type) =>
    dropzone.addEventListener(type, (event) => {
      event.preventDefault();
      dropzone.classList.add("dragging");
    })
  );
  ["dragleave", "drop"].forEach((type) =>
    dropzone.addEventListener(type, () => dropzone.classList.remove("dragging"))
  );
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      input.dispatchEvent(new Event("change"));
    }
  });
  // A file dropped next to the drop zone must not make the browser navigate away from the page.
  ["dragover", "drop"].forEach((type) => window.addEventListener(type, (event) => event.preventDefault()));

  // ---- result -----------------------------------------------------------------------------------------
  function setImage(id, base64) {
    const img = $(id);
    if (base64) {
      img.src = "data:image/png;base64," + base64;
      img.parentElement.hidden = false;
    } else {
      img.removeAttribute("src");
      img.parentElement.hidden = true;
    }
  }

  function showResult(r) {
    $("bone-age").textContent = r.bone_age_months.toFixed(1);
    $("bone-age-text").textContent = "= " + r.bone_age_text;
    const flag = $("flag");
    const flagText = {
      normal: "normal (within ±2 SD)",
      advanced: "advanced (above +2 SD)",
      delayed: "delayed (below −2 SD)",
    };
    if (r.flag_withheld) {
      // issue #43 item 5: under a caution the advanced/delayed flag is not a finding
      flag.textContent = "flag " + r.flag_withheld;
      flag.className = "flag withheld";
    } else {
      flag.textContent = r.flag ? flagText[r.flag] || r.flag : "no SD score without age";
      flag.className = "flag " + (r.flag || "none");
    }
    const cautions = r.cautions || [];
    $("caution-list").replaceChildren(
      ...cautions.map((text) => {
        const item = document.createElement("li");
        item.textContent = text;
        return item;
      }),
    );
    $("cautions").hidden = !cautions.length;
    $("uncertainty").textContent =
      r.uncertainty_months == null ? "—" : "± " + r.uncertainty_months.toFixed(1) + " months";
    $("result-sex").textContent = r.sex;
    if (r.chronological_age_months == null) {
      $("chron-age").textContent = "not given (needed for the SD score)";
      $("difference").textContent = "—";
      $("sd-score").textContent = "—";
    } else {
      $("chron-age").textContent =
        r.chronological_age_text + " (" + r.chronological_age_months.toFixed(1) + " months)";
      $("difference").textContent =
        signed(r.difference_months, 1) + " months (" + monthsToText(r.difference_months) + ")";
      $("sd-score").textContent =
        r.sd_score == null ? "—" : signed(r.sd_score, 2) + " SD (1 SD = " + r.sd_months.toFixed(1) + " months)";
    }
    const list = $("warnings");
    list.replaceChildren();
    (r.warnings || []).filter((text) => !cautions.includes(text)).forEach((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      list.appendChild(item);
    });
    list.hidden = !list.children.length;
    showGrowth(r);
    setImage("heatmap", r.heatmap_png_base64);
    setImage("sd-chart", r.sd_chart_png_base64);
    $("reference").textContent = "Reference: " + (r.reference || "");
    $("empty").hidden = true;
    $("result").hidden = false;
  }

  // ---- growth work-up (issue #45): every figure with its method, or the line saying why there is none ----
  function showGrowth(r) {
    const box = $("growth");
    const note = $("calibration-note");
    const c = r.calibration;
    note.hidden = !c;
    note.textContent = c
      ? "Calibrated with " + (c.file || "a site calibration") + " (" + c.cases + " cases): " +
        (c.applied ? "the model's own bone age was " + c.bone_age_uncalibrated_months.toFixed(1) + " months."
          : "no correction for this sex.")
      : "";
    const a = r.adult_height;
    if (!a) {
      $("adult-height").textContent = "— (enter the height)";
    } else if (a.predicted_adult_height_cm == null) {
      $("adult-height").textContent = a.not_available;
    } else {
      let text = a.predicted_adult_height_cm.toFixed(1) + " cm (" + a.percent_of_mature_height.toFixed(1) +
        "% of adult height reached; " + a.bayley_pinneau_column + " table)";
      if (a.predicted_adult_height_range_cm) {
        text += "; published error SD " + a.predicted_adult_height_error_sd_cm.toFixed(1) + " cm, ±2 SD " +
          a.predicted_adult_height_range_cm[0].toFixed(1) + "–" + a.predicted_adult_height_range_cm[1].toFixed(1);
      } else {
        text += "; no published error at this age";
      }
      $("adult-height").textContent = text;
    }
    const t = r.target_height;
    $("target-height").textContent = t
      ? t.target_height_cm.toFixed(1) + " cm (range " + t.target_height_range_cm[0].toFixed(1) + "–" +
        t.target_height_range_cm[1].toFixed(1) + " cm)"
      : "— (enter both parents' heights)";
    const f = r.follow_up;
    const table = $("follow-up");
    const body = table.querySelector("tbody");
    body.replaceChildren();
    if (!f) {
      $("velocity").textContent = "— (add earlier results)";
    } else {
      const last = f.intervals.length ? f.intervals[f.intervals.length - 1] : null;
      $("velocity").textContent = last
        ? last.velocity_months_per_year.toFixed(1) + " ± " + last.velocity_uncertainty_months_per_year.toFixed(1) +
          " bone-age months per year since the last visit"
        : f.not_available || "—";
      f.visits.forEach((v, i) => {
        const step = i > 0 && f.intervals.length ? f.intervals[i - 1] : null;
        const row = document.createElement("tr");
        [v.label + (v.current ? " (this visit)" : ""), v.chronological_age_months.toFixed(1),
          v.bone_age_months.toFixed(1) + " ± " + v.uncertainty_months.toFixed(1),
          step ? step.velocity_months_per_year.toFixed(1) + " ± " +
            step.velocity_uncertainty_months_per_year.toFixed(1) : "—"].forEach((text) => {
          const cell = document.createElement("td");
          cell.textContent = text;
          row.appendChild(cell);
        });
        body.appendChild(row);
      });
    }
    table.hidden = !f;
    const limits = $("growth-limits");
    limits.replaceChildren();
    const sources = [];
    if (a) sources.push("Bayley–Pinneau: " + a.source, ...a.limits);
    if (t) sources.push("Tanner: " + t.source);
    if (f) sources.push("Follow-up: " + f.method_text);
    sources.forEach((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      limits.appendChild(item);
    });
    box.hidden = !(a || t || f || c);
  }

  async function errorMessage(response) {
    let detail = "";
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (_) {
      detail = response.statusText;
    }
    return "Error " + response.status + ": " + (detail || "request failed");
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError("");
    const file = chosenFile();
    if (!file) {
      showError("Choose a radiograph first (PNG, JPEG or DICOM).");
      return;
    }
    if (file.size > maxBytes) {
      showError("This file is larger than the " + (maxBytes / 1048576) + " MB upload limit.");
      return;
    }
    submit.disabled = true;
    setStatus("Assessing… this can take a few seconds.");
    $("result").hidden = true;
    $("empty").hidden = false;
    try {
      const response = await fetch(API + "/predict", { method: "POST", body: new FormData(form) });
      if (!response.ok) {
        showError(await errorMessage(response));
        return;
      }
      showResult(await response.json());
    } catch (err) {
      showError("Could not reach the server (" + err.message + ").");
    } finally {
      submit.disabled = false;
      setStatus("");
    }
  });

  // ---- service facts ----------------------------------------------------------------------------------
  async function loadFacts() {
    try {
      const health = await (await fetch(API + "/health")).json();
      if (health.max_upload_mb) {
        maxBytes = health.max_upload_mb * 1024 * 1024;
        $("max-mb").textContent = String(health.max_upload_mb);
      }
      const response = await fetch(API + "/model");
      if (!response.ok) {
        $("model-facts").textContent = "Model: " + (await errorMessage(response));
        return;
      }
      const m = await response.json();
      const parts = ["Model: " + m.backbone];
      if (m.input_size) parts.push(m.input_size + " px input");
      if (m.headline && m.headline.mae_months != null) {
        parts.push("mean absolute error " + Number(m.headline.mae_months).toFixed(2) + " months on " +
          m.headline.images + " " + m.headline.on);
      }
      if (m.model_version) parts.push("model version " + m.model_version);
      if (m.training_data) parts.push("trained on " + m.training_data);
      $("model-facts").textContent = parts.join(" · ");
    } catch (err) {
      $("model-facts").textContent = "Model: unknown (" + err.message + ")";
    }
  }

  loadFacts();
})();
