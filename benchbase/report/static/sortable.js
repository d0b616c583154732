// Sortable tables: click a header; numbers (data-v) sort as numbers, statuses last.
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        var xv = x.hasAttribute('data-v') ? parseFloat(x.getAttribute('data-v')) : null;
        var yv = y.hasAttribute('data-v') ? parseFloat(y.getAttribute('data-v')) : null;
        if (xv !== null && yv !== null) return asc ? xv - yv : yv - xv;
        if (xv !== null) return -1;
        if (yv !== null) return 1;
        var r = x.textContent.localeCompare(y.textContent);
        return asc ? r : -r;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
