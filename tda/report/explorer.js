// The report's explorer: a list of targets; a click shows the target's text and, for the chosen
// method, its top proponents (highest scores) and opponents (lowest) with their text and metadata.
// Reads the JSON in #explorer-data (tda/report/explorer.py writes it).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("explorer-data").textContent || "{}");
  const list = document.querySelector("#targets tbody");
  const method = document.getElementById("method");
  const filter = document.getElementById("filter");
  const detail = document.getElementById("detail");
  if (!list || !data.methods) return;
  let picked = null;

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function example(id) {
    return data.examples[String(id)] || ["", ""];
  }

  function fillMethods() {
    for (const name of data.methods) {
      const option = el("option", name);
      option.value = name;
      method.appendChild(option);
    }
  }

  function fillTargets() {
    list.replaceChildren();
    const words = filter.value.trim().toLowerCase();
    for (const target of data.targets) {
      const prompt = example(target.id)[0] || "";
      if (words && !(String(target.id) + " " + prompt.toLowerCase()).includes(words)) continue;
      const row = el("tr");
      row.dataset.target = String(target.id);
      const lds = target.lds[method.value];
      for (const cell of [target.id, target.role || "", lds === undefined || lds === null ? "–" : lds]) {
        row.appendChild(el("td", cell));
      }
      row.appendChild(el("td", prompt, "prompt"));
      if (String(target.id) === picked) row.classList.add("picked");
      row.addEventListener("click", () => show(String(target.id)));
      list.appendChild(row);
    }
  }

  function examplesTable(kind, ids, scores) {
    const table = el("table", null, "examples " + kind);
    const head = el("tr");
    for (const name of ["#", "example", "score", "prompt", "response"].concat(data.columns)) {
      head.appendChild(el("th", name));
    }
    table.appendChild(el("thead")).appendChild(head);
    const body = table.appendChild(el("tbody"));
    ids.forEach((id, i) => {
      const [prompt, response, ...meta] = example(id);
      const row = el("tr");
      row.appendChild(el("td", i + 1));
      row.appendChild(el("td", id));
      row.appendChild(el("td", scores[i], "score"));
      row.appendChild(el("td", prompt, "text"));
      row.appendChild(el("td", response, "text"));
      for (const value of meta) row.appendChild(el("td", value));
      body.appendChild(row);
    });
    return table;
  }

  function show(id) {
    picked = id;
    for (const row of list.querySelectorAll("tr")) {
      row.classList.toggle("picked", row.dataset.target === id);
    }
    const [prompt, response] = example(id);
    const cell = (data.top[method.value] || {})[id];
    detail.replaceChildren(el("h3", "target " + id + " · " + method.value));
    detail.appendChild(el("div", prompt + "\n→ " + response, "target-text"));
    if (!cell) {
      detail.appendChild(el("p", "no scores of " + method.value + " for this target", "empty"));
      return;
    }
    detail.appendChild(el("h3", "top " + cell[0].length + " proponents (highest scores: helped)"));
    detail.appendChild(examplesTable("proponents", cell[0], cell[1]));
    detail.appendChild(el("h3", "top " + cell[2].length + " opponents (lowest scores: hurt)"));
    if (data.opponents[method.value] === false) {
      detail.appendChild(el("p", "the score step kept only each target's top k: its lowest are not opponents", "empty"));
    }
    detail.appendChild(examplesTable("opponents", cell[2], cell[3]));
  }

  fillMethods();
  fillTargets();
  method.addEventListener("change", () => {
    fillTargets();
    if (picked !== null) show(picked);
  });
  filter.addEventListener("input", fillTargets);
})();
