/* cryknn's HTML report: the structures table, one structure's 3D view (3Dmol.js) and its
   sortable sites table. The data is the JSON in #cryknn-data, written by cryknn/report.py:
     structures[i] = {id, plausibility, modelled, atoms, warnings, counts, cell (9 numbers,
       rows a b c), elements, z (per atom: index into elements), xyz (3 per atom, angstrom),
       site (per atom: index into sites), sites: [[label, given, predicted, p_predicted,
       p_given, multiplicity, flag, top3], ...]}
   The status line (#status) says 'drawn N atoms of ID' once a structure is drawn, or the
   first error; the browser test reads it. */
(function () {
  'use strict';
  // Flag colours outside the element scheme (oxygen is red, phosphorus and iron orange).
  var COLOURS = {implausible: '#e6007e', outside_domain: '#00a6a6'};
  var FLAG_TEXT = {implausible: 'implausible', outside_domain: 'outside domain', '': ''};
  var MAX_LABELS = 20;       // labels in one view at most (each is a texture)
  var MAX_HIGHLIGHT = 200;   // atoms of one site marked when it is clicked
  var SITE = {label: 0, given: 1, predicted: 2, pPredicted: 3, pGiven: 4, atoms: 5, flag: 6, top: 7};
  var data = JSON.parse(document.getElementById('cryknn-data').textContent);
  var status = document.getElementById('status');
  var viewer = null, highlight = [], current = -1, structuresTable = null;

  function setStatus(text) {
    if (window.cryknnErrors.length) return;  // the first error stays visible
    status.textContent = text;
    status.setAttribute('data-state', 'ok');
  }

  function fmt(p) { return p === null || p === undefined ? '-' : p.toFixed(3); }

  function text(id, value) { document.getElementById(id).textContent = value; }

  /* A table whose column headers sort it (a second click reverses; missing values last).
     columns: [{name, value(row) -> sort key, show(row) -> text (default: value), num}]. */
  function SortableTable(table, columns, rows, onClick, rowClass) {
    this.table = table; this.columns = columns; this.rows = rows;
    this.onClick = onClick; this.rowClass = rowClass;
    this.order = rows.map(function (_, i) { return i; });
    this.sortColumn = -1; this.direction = 1; this.selected = -1;
    this.render();
  }

  SortableTable.prototype.sortBy = function (j) {
    var key = this.columns[j].value, rows = this.rows;
    var direction = this.direction = j === this.sortColumn ? -this.direction : 1;
    this.sortColumn = j;
    this.order.sort(function (a, b) {
      var x = key(rows[a]), y = key(rows[b]);
      var xMissing = x === null || x === undefined, yMissing = y === null || y === undefined;
      if (xMissing || yMissing) return xMissing === yMissing ? a - b : (xMissing ? 1 : -1);
      return x < y ? -direction : x > y ? direction : a - b;
    });
    this.render();
  };

  SortableTable.prototype.render = function () {
    var self = this, head = document.createElement('thead'), body = document.createElement('tbody');
    var tr = head.insertRow();
    this.columns.forEach(function (c, j) {
      var th = document.createElement('th');
      th.textContent = c.name;
      th.title = 'sort by ' + c.name;
      if (j === self.sortColumn) th.className = self.direction > 0 ? 'sorted-asc' : 'sorted-desc';
      th.addEventListener('click', function () { self.sortBy(j); });
      tr.appendChild(th);
    });
    this.order.forEach(function (i) {
      var row = body.insertRow(), item = self.rows[i];
      row.className = (self.rowClass ? self.rowClass(item) : '') + (i === self.selected ? ' selected' : '');
      row.addEventListener('click', function () { self.onClick(i); });
      self.columns.forEach(function (c) {
        var cell = row.insertCell();
        cell.textContent = (c.show || c.value)(item);
        if (c.num) cell.className = 'num';
      });
    });
    this.table.textContent = '';
    this.table.appendChild(head);
    this.table.appendChild(body);
  };

  SortableTable.prototype.select = function (i) { this.selected = i; this.render(); };

  function structureColumns() {
    return [
      {name: '#', value: function (s) { return s.n; }, num: true},
      {name: 'structure', value: function (s) { return s.id; }},
      {name: 'atoms', value: function (s) { return s.atoms; }, num: true},
      {name: 'plausibility', value: function (s) { return s.plausibility; },
       show: function (s) { return fmt(s.plausibility); }, num: true},
      {name: 'implausible sites', value: function (s) { return s.counts.implausible; }, num: true},
      {name: 'outside domain', value: function (s) { return s.counts.outside_domain; }, num: true},
      {name: 'warnings', value: function (s) { return s.warnings.length; }, num: true}
    ];
  }

  function siteColumns() {
    return [
      {name: 'site', value: function (r) { return r[SITE.label]; }},
      {name: 'given', value: function (r) { return r[SITE.given]; }},
      {name: 'predicted', value: function (r) { return r[SITE.predicted]; }},
      {name: 'p(predicted)', value: function (r) { return r[SITE.pPredicted]; },
       show: function (r) { return fmt(r[SITE.pPredicted]); }, num: true},
      {name: 'p(given)', value: function (r) { return r[SITE.pGiven]; },
       show: function (r) { return fmt(r[SITE.pGiven]); }, num: true},
      {name: 'atoms', value: function (r) { return r[SITE.atoms]; }, num: true},
      {name: 'flag', value: function (r) { return FLAG_TEXT[r[SITE.flag]]; }},
      {name: 'top 3', value: function (r) { return r[SITE.top]; }}
    ];
  }

  function rowFlag(s) {
    return s.counts.implausible ? 'implausible' : s.counts.outside_domain ? 'outside_domain' : '';
  }

  function position(s, a) { return {x: s.xyz[3 * a], y: s.xyz[3 * a + 1], z: s.xyz[3 * a + 2]}; }

  function atomsOf(s, r) {
    var atoms = [];
    for (var a = 0; a < s.site.length; a++) if (s.site[a] === r) atoms.push(a);
    return atoms;
  }

  function drawCell(s) {
    var c = s.cell, corners = [];
    for (var i = 0; i < 8; i++) {
      var f = [i & 1, (i >> 1) & 1, (i >> 2) & 1];
      corners.push({x: f[0] * c[0] + f[1] * c[3] + f[2] * c[6],
                    y: f[0] * c[1] + f[1] * c[4] + f[2] * c[7],
                    z: f[0] * c[2] + f[1] * c[5] + f[2] * c[8]});
    }
    [[0, 1], [0, 2], [0, 4], [1, 3], [1, 5], [2, 3], [2, 6], [3, 7], [4, 5], [4, 6], [5, 7], [6, 7]]
      .forEach(function (e) {
        viewer.addCylinder({start: corners[e[0]], end: corners[e[1]], radius: 0.05,
                            color: '#555555', fromCap: 1, toCap: 1});
      });
  }

  /* The flagged sites to label: implausible ones first, least plausible first, then those
     outside the domain; at most MAX_LABELS. */
  function labelledSites(s) {
    var rows = [];
    s.sites.forEach(function (row, r) { if (row[SITE.flag]) rows.push(r); });
    rows.sort(function (a, b) {
      var x = s.sites[a], y = s.sites[b];
      var xi = x[SITE.flag] === 'implausible' ? 0 : 1, yi = y[SITE.flag] === 'implausible' ? 0 : 1;
      if (xi !== yi) return xi - yi;
      return (x[SITE.pGiven] === null ? 2 : x[SITE.pGiven]) - (y[SITE.pGiven] === null ? 2 : y[SITE.pGiven]) || a - b;
    });
    return {total: rows.length, shown: rows.slice(0, MAX_LABELS)};
  }

  function flagAtoms(s) {
    var flagged = {implausible: [], outside_domain: []}, firstAtom = {};
    for (var a = 0; a < s.site.length; a++) {
      var flag = s.sites[s.site[a]][SITE.flag];
      if (!flag) continue;
      flagged[flag].push(a);
      if (!(s.site[a] in firstAtom)) firstAtom[s.site[a]] = a;
    }
    Object.keys(flagged).forEach(function (flag) {
      if (flagged[flag].length) {
        viewer.setStyle({serial: flagged[flag]}, {sphere: {scale: 0.45, color: COLOURS[flag]},
                                                  stick: {radius: 0.12}});
      }
    });
    var labels = labelledSites(s);
    labels.shown.forEach(function (r) {
      var row = s.sites[r], flag = row[SITE.flag];
      var label = row[SITE.label] + ' ' + row[SITE.given] + (flag === 'implausible'
        ? ' \u2192 ' + row[SITE.predicted] + '? p(given) ' + fmt(row[SITE.pGiven]) : ': outside domain');
      viewer.addLabel(label, {position: position(s, firstAtom[r]), fontSize: 11, fontColor: 'black',
                              backgroundColor: COLOURS[flag], backgroundOpacity: 0.75, inFront: true});
    });
    text('label-note', labels.total > labels.shown.length ? 'Labels on ' + labels.shown.length +
         ' of ' + labels.total + ' flagged sites (the least plausible first); every flagged atom is coloured.' : '');
  }

  function xyzText(s) {
    var lines = [String(s.z.length), 'cryknn'];
    for (var a = 0; a < s.z.length; a++) {
      lines.push(s.elements[s.z[a]] + ' ' + s.xyz[3 * a] + ' ' + s.xyz[3 * a + 1] + ' ' + s.xyz[3 * a + 2]);
    }
    return lines.join('\n');
  }

  function draw(s) {
    if (!viewer) {
      viewer = $3Dmol.createViewer(document.getElementById('viewer'), {backgroundColor: 'white'});
      if (!viewer) throw new Error('the 3D view needs WebGL, which this browser does not offer');
    }
    viewer.clear();
    highlight = [];
    viewer.addModel(xyzText(s), 'xyz');
    viewer.setStyle({}, {sphere: {scale: 0.25}, stick: {radius: 0.12}});
    flagAtoms(s);
    drawCell(s);
    viewer.zoomTo();
    viewer.render();
  }

  function findSite(s, r) {
    if (!viewer) return;
    highlight.forEach(function (shape) { viewer.removeShape(shape); });
    var atoms = atomsOf(s, r);
    highlight = atoms.slice(0, MAX_HIGHLIGHT).map(function (a) {
      return viewer.addSphere({center: position(s, a), radius: 1.0, color: '#1f77b4', opacity: 0.45});
    });
    viewer.zoomTo({serial: atoms}, 400);
    viewer.render();
  }

  function describe(s) {
    text('structure-id', s.id);
    var what = 'plausibility ' + fmt(s.plausibility) + ' (' + s.modelled + ' of ' + s.atoms +
      ' atoms modelled); ' + s.counts.implausible + ' implausible, ' + s.counts.outside_domain +
      ' outside the domain, of ' + s.sites.length + ' sites';
    text('structure-score', what);
    var list = document.getElementById('structure-warnings');
    list.textContent = '';
    s.warnings.forEach(function (w) {
      var item = document.createElement('li');
      item.textContent = 'warning: ' + w;
      list.appendChild(item);
    });
  }

  function show(i) {
    var s = data.structures[i];
    current = i;
    describe(s);
    new SortableTable(document.getElementById('sites'), siteColumns(), s.sites,
                      function (r) { if (current === i) findSite(s, r); },
                      function (r) { return r[SITE.flag]; });
    if (structuresTable) structuresTable.select(i);
    if (!s.xyz) { setStatus('no coordinates for ' + s.id); return; }
    draw(s);
    var box = document.getElementById('viewer').getBoundingClientRect();
    status.setAttribute('data-viewer-box', [box.left + window.scrollX, box.top + window.scrollY,
                                            box.width, box.height].map(Math.round).join(' '));
    // Files the page fetched (scripts, images, data): none, since it is self-contained.
    status.setAttribute('data-resources', String(performance.getEntriesByType('resource').length));
    setStatus('drawn ' + s.z.length + ' atoms of ' + s.id);
  }

  function summary() {
    var n = data.structures.length, flagged = 0, outside = 0;
    data.structures.forEach(function (s) {
      if (s.counts.implausible) flagged++;
      if (s.counts.outside_domain) outside++;
    });
    text('summary', n + ' structure' + (n === 1 ? '' : 's') + ' scored by ' + data.model +
         '; ' + flagged + ' with an implausible site (' + data.rule + '), ' + outside +
         ' with sites outside the model\'s domain.');
  }

  function start() {
    summary();
    data.structures.forEach(function (s, i) { s.n = i + 1; });
    if (!data.structures.length) { setStatus('no structures'); return; }
    structuresTable = new SortableTable(document.getElementById('structures'), structureColumns(),
                                        data.structures, function (i) {
                                          try { history.replaceState(null, '', '#' + (i + 1)); } catch (e) { /* a sandboxed page */ }
                                          show(i);
                                        }, rowFlag);
    var wanted = parseInt(location.hash.slice(1), 10);
    show(wanted >= 1 && wanted <= data.structures.length ? wanted - 1 : 0);
  }

  try {
    start();
  } catch (e) {
    window.cryknnRecordError(e && e.message ? e.message : e);
  }
})();
