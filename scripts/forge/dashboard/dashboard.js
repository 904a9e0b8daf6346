// The dashboard's only script: ask before an action that stops or restarts processes
// (forms with a data-confirm question). Without it the forms still work, unasked.
document.addEventListener("submit", function (event) {
  var question = event.target.getAttribute("data-confirm");
  if (question && !window.confirm(question)) event.preventDefault();
});
