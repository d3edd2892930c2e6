// Fine-tune tab glue (classic script: the WebUI loads every javascript/*.js into <head>; the standalone app too).
// It polls a running job by clicking the tab's hidden refresh button, and starts the WebUI progress bar on Train.

function finetune_root() {
    return typeof gradioApp === "function" ? gradioApp() : document;
}

// A status panel rendered with data-running="1" belongs to a job in progress: ask the server for news. Every panel
// asks once after the page (re)loads too, so the page shows the job as the server knows it, not as it was when the
// page was built. The Train button says "Training..." while its job runs.
function finetune_poll() {
    var root = finetune_root();
    if (!root || !root.querySelectorAll) return;
    root.querySelectorAll('.finetune-status').forEach(function(panel) {
        var slug = (panel.getAttribute("data-method") || "").replace(/-/g, "_");
        var holder = root.querySelector("#finetune_" + slug + "_progress");
        var running = panel.getAttribute("data-running") === "1";
        var button = root.querySelector("#finetune_" + slug + "_refresh");
        if (button && (running || (holder && !holder.finetune_seen))) {
            if (holder) holder.finetune_seen = true;
            button.click();
        }
        var train = root.querySelector("#finetune_" + slug + "_train");
        if (train) {
            train.classList.toggle("finetune-training", running);
            train.textContent = running ? "Training..." : "Train";
        }
    });
}

if (!window.finetune_poll_timer) {
    window.finetune_poll_timer = setInterval(finetune_poll, 1000);
}

// Train button's JS (WebUI): the first input holds the method slug; replace it with a new task id and start the
// WebUI's own progress bar on that id. Outside the WebUI (no requestProgress) the arguments pass through unchanged.
function finetune_start_training() {
    var args = Array.prototype.slice.call(arguments);
    var slug = String(args[0] || "");
    if (typeof randomId !== "function" || typeof requestProgress !== "function") return args;
    var root = finetune_root();
    var id = randomId();
    var container = root.querySelector("#finetune_" + slug + "_status");
    var gallery = root.querySelector("#finetune_" + slug + "_gallery");
    if (container) {
        requestProgress(id, container, gallery, function() {}, function() {});
    }
    args[0] = id;
    return args;
}
