// retort review: keyboard shortcuts, the live diff and drafts of unsent edits.
// Text from the data is only ever written with textContent or .value, never as markup.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("decision");
  const typing = (el) =>
    el && (el.tagName === "TEXTAREA" || el.tagName === "INPUT" || el.tagName === "SELECT" || el.isContentEditable);
  const follow = (id) => {
    const a = $(id);
    if (a && a.href) {
      location.href = a.href;
      return true;
    }
    return false;
  };
  const click = (id) => {
    const b = $(id);
    if (b) b.click();
  };

  // ---- drafts: what was typed but not yet sent survives a browser crash or a closed tab
  const draftKey = form ? "retort-review:" + form.dataset.draftKey : null;
  const fields = () => ({ input: $("input").value, answer: $("answer").value, human: $("human").value });
  const saveDraft = () => {
    try {
      localStorage.setItem(draftKey, JSON.stringify(fields()));
    } catch (_) {
      /* storage full or disabled: the server copy is what counts */
    }
  };
  const dropDraft = () => {
    try {
      localStorage.removeItem(draftKey);
    } catch (_) {}
  };

  // ---- the live diff, computed by the server (one diff implementation), drawn as text
  const draw = (box, spans, emptyText) => {
    if (!box) return;
    box.replaceChildren();
    const changed = spans.some((s) => s.op !== "eq");
    if (!changed && emptyText) {
      const none = document.createElement("span");
      none.className = "none";
      none.textContent = emptyText;
      box.append(none);
    } else {
      for (const s of spans) {
        const el = document.createElement(s.op === "del" ? "del" : s.op === "ins" ? "ins" : "span");
        el.textContent = s.text;
        box.append(el);
      }
    }
    if (!emptyText) box.hidden = !changed;
  };
  let timer = null;
  const refreshDiff = () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      try {
        const r = await fetch("/api/diff", {
          method: "POST",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": form.dataset.csrf },
          body: JSON.stringify({ item: form.dataset.item, input: $("input").value, answer: $("answer").value }),
        });
        if (!r.ok) return;
        const d = await r.json();
        draw($("input-diff"), d.input, null);
        draw($("answer-diff"), d.answer, "no changes");
      } catch (_) {
        /* the server is away; the edit is still in the draft */
      }
    }, 200);
  };

  const setHuman = (human) => {
    $("human").value = human ? "1" : "0";
    $("answer-origin").textContent = human ? "written by you" : "teacher's, editable";
  };

  if (form) {
    // A draft left from before (crash, closed tab) is restored, and said so.
    let draft = null;
    try {
      draft = JSON.parse(localStorage.getItem(draftKey) || "null");
    } catch (_) {}
    const now = fields();
    if (draft && (draft.input !== now.input || draft.answer !== now.answer || draft.human !== now.human)) {
      $("input").value = draft.input;
      $("answer").value = draft.answer;
      setHuman(draft.human === "1");
      $("draft-notice").hidden = false;
      refreshDiff();
    }
    $("discard-draft").addEventListener("click", () => {
      dropDraft();
      location.reload();
    });
    for (const id of ["input", "answer"]) {
      $(id).addEventListener("input", () => {
        saveDraft();
        refreshDiff();
      });
    }
    $("own").addEventListener("click", () => {
      setHuman(true);
      $("answer").value = "";
      $("answer").focus();
      saveDraft();
      refreshDiff();
    });
    if ($("restore")) {
      $("restore").addEventListener("click", () => {
        setHuman(false);
        $("answer").value = $("original-answer").value;
        saveDraft();
        refreshDiff();
      });
    }
    form.addEventListener("submit", (e) => {
      const action = e.submitter ? e.submitter.value : "";
      if (action === "reject" && !$("reason").value.trim()) {
        e.preventDefault();
        $("reason").focus();
        $("reason").placeholder = "a reason is needed to reject";
        return;
      }
      dropDraft();
    });
  }

  document.addEventListener("keydown", (e) => {
    if (e.altKey || e.metaKey) return;
    if (typing(e.target)) {
      if (e.key === "Escape") {
        e.preventDefault();
        e.target.blur();
      } else if (e.key === "Enter" && e.ctrlKey && form) {
        e.preventDefault();
        click("accept");
      } else if (e.key === "Enter" && e.target.id === "reason") {
        e.preventDefault();
        click("reject");
      }
      return;
    }
    if (e.ctrlKey) return;
    let handled = true;
    switch (e.key) {
      case "a":
        if (form) click("accept");
        break;
      case "r":
        if (form) {
          if ($("reason").value.trim()) click("reject");
          else $("reason").focus();
        }
        break;
      case "s":
        if (form) click("skip");
        break;
      case "w":
        if (form) click("own");
        break;
      case "e":
        if (form) $("answer").focus();
        break;
      case "j":
      case "ArrowRight":
        handled = follow("next") || follow("next-page");
        break;
      case "k":
      case "ArrowLeft":
        handled = follow("prev") || follow("prev-page");
        break;
      case "q":
        handled = follow("to-queue");
        break;
      case "/":
        if ($("search")) $("search").focus();
        else handled = false;
        break;
      default:
        handled = false;
    }
    if (handled) e.preventDefault();
  });
})();
