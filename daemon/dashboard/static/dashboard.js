// Clicking a checkpoint in the lineage graph selects it for the promote / roll-back form.
// Without JavaScript the nodes are plain links to their iteration pages.
(function () {
  "use strict";
  var graph = document.getElementById("lineage-graph");
  var field = document.getElementById("checkpoint");
  var selection = document.getElementById("selection");
  if (!graph || !field) { return; }
  function select(node) {
    var previous = graph.querySelector(".node.selected");
    if (previous) { previous.classList.remove("selected"); }
    node.classList.add("selected");
    var id = node.getAttribute("data-checkpoint");
    var status = node.getAttribute("data-status");
    field.value = status === "rejected" ? "" : id;
    var link = node.parentNode && node.parentNode.getAttribute ? node.parentNode.getAttribute("href") : null;
    selection.textContent = "selected " + id + " (" + status + ")" + (status === "rejected" ? ": rejected checkpoints cannot be promoted" : "");
    if (link) {
      var a = document.createElement("a");
      a.href = link;
      a.textContent = " open its iteration";
      selection.appendChild(a);
    }
  }
  graph.addEventListener("click", function (event) {
    var node = event.target.closest(".node");
    if (!node) { return; }
    event.preventDefault();
    select(node);
  });
  graph.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && event.target.classList && event.target.classList.contains("node")) { select(event.target); }
  });
})();
