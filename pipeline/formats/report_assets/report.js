/* GeoPixelD QA report: filters by category, backend, model, review status and split, across
   every page. The data comes from data/index.js (window.QA_INDEX), loaded by a <script> tag
   because Chromium refuses fetch() of local files. The filter lives in the URL hash
   ("#category=ship&backend=template"), so the paging links carry it from page to page.
   QA_INDEX = {facets: {name: [values]}, pages: [file names],
               tiles: [[tile id, page index, [[value codes] per facet]]]} */
(function () {
  "use strict";

  var index = window.QA_INDEX;
  var facets = Object.keys(index.facets);
  var byTile = {};
  index.tiles.forEach(function (entry) { byTile[entry[0]] = entry; });

  function selection() {
    var params = new URLSearchParams(window.location.hash.slice(1));
    var chosen = {};
    facets.forEach(function (facet) {
      var code = index.facets[facet].indexOf(params.get(facet));
      if (params.has(facet) && code >= 0) { chosen[facet] = code; }
    });
    return chosen;
  }

  function hashOf(chosen) {
    var params = new URLSearchParams();
    facets.forEach(function (facet) {
      if (facet in chosen) { params.set(facet, index.facets[facet][chosen[facet]]); }
    });
    var text = params.toString();
    return text ? "#" + text : "";
  }

  function matches(entry, chosen) {
    return facets.every(function (facet, k) {
      return !(facet in chosen) || entry[2][k].indexOf(chosen[facet]) >= 0;
    });
  }

  function onChange() {
    var chosen = {};
    document.querySelectorAll("#filters select").forEach(function (select) {
      if (select.value !== "") { chosen[select.dataset.facet] = Number(select.value); }
    });
    var hash = hashOf(chosen);
    if (hash) {
      window.location.hash = hash;
    } else {
      window.history.replaceState(null, "", window.location.pathname + window.location.search);
      apply();
    }
  }

  function buildFilters() {
    var box = document.getElementById("filters");
    if (!box) { return; }
    facets.forEach(function (facet) {
      var label = document.createElement("label");
      label.textContent = facet + " ";
      var select = document.createElement("select");
      select.dataset.facet = facet;
      select.name = facet;
      select.add(new Option("all", ""));
      index.facets[facet].forEach(function (value, code) {
        select.add(new Option(value, String(code)));
      });
      select.addEventListener("change", onChange);
      label.appendChild(select);
      box.appendChild(label);
    });
  }

  function apply() {
    var chosen = selection();
    var hash = hashOf(chosen);
    document.querySelectorAll("#filters select").forEach(function (select) {
      var facet = select.dataset.facet;
      select.value = facet in chosen ? String(chosen[facet]) : "";
    });

    var perPage = index.pages.map(function () { return 0; });
    var total = 0;
    index.tiles.forEach(function (entry) {
      if (matches(entry, chosen)) { perPage[entry[1]] += 1; total += 1; }
    });

    var shown = 0;
    var here = document.querySelectorAll("article.tile");
    here.forEach(function (article) {
      var entry = byTile[article.dataset.tile];
      var visible = entry !== undefined && matches(entry, chosen);
      article.hidden = !visible;
      if (visible) { shown += 1; }
    });

    document.querySelectorAll("a[data-page]").forEach(function (link) {
      var page = Number(link.dataset.page);
      link.href = index.pages[page] + hash;
      link.classList.toggle("empty", perPage[page] === 0);
      link.title = perPage[page] + " matching tiles";
    });

    var status = document.getElementById("status");
    if (status) {
      var pagesWith = perPage.filter(function (n) { return n > 0; }).length;
      var text = total + " of " + index.tiles.length + " tiles match, on " + pagesWith +
        " of " + index.pages.length + " pages";
      if (document.body.dataset.page !== "") {
        text = shown + " of " + here.length + " tiles on this page match; " + text;
      }
      status.textContent = hash ? text : text.replace(" match", "");
    }
  }

  buildFilters();
  window.addEventListener("hashchange", apply);
  apply();
}());
