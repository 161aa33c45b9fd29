// Runs `gllm serve` as a child process of the game and waits until it answers a ping, so a game can ship the
// runtime beside itself and start it on launch:
//
//   runtime = RuntimeProcess.Start(pathToGllm, RuntimeProcess.ServeArguments(endpoint, model), endpoint);
//   runtime.Output += line => Debug.Log(line);     // raised on a thread-pool thread
//   await runtime.WaitReady(TimeSpan.FromMinutes(2));
//   ...
//   runtime.Dispose();                              // kills it; never blocks
//
// Loading a model takes seconds (longer on first use), hence a generous ready timeout. A runtime that
// exits early (bad model path, port taken) fails WaitReady with its exit code and last lines of output.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Threading;
using System.Threading.Tasks;

namespace Gllm
{
    public sealed class RuntimeProcess : IDisposable
    {
        const int KeptLines = 40;
        readonly Queue<string> lastLines = new Queue<string>();

        RuntimeProcess(Process process, string endpoint)
        {
            Process = process;
            Endpoint = endpoint;
        }

        public Process Process { get; private set; }
        public string Endpoint { get; private set; }

        /// <summary>Each line the runtime writes to stdout or stderr (its log), on a thread-pool thread.</summary>
        public event Action<string> Output;

        /// <summary>Arguments for `gllm serve` (the gllm executable; prefix "-m gllm " to run it with python).</summary>
        public static string ServeArguments(string endpoint, string model = null, string extra = null)
        {
            string args = "serve --bind " + Quote(endpoint);
            if (!string.IsNullOrEmpty(model)) args += " --model " + Quote(model);
            if (!string.IsNullOrEmpty(extra)) args += " " + extra;
            return args;
        }

        /// <summary>Starts the runtime; <paramref name="endpoint"/> must be the one given to --bind.</summary>
        public static RuntimeProcess Start(string executable, string arguments, string endpoint)
        {
            var info = new ProcessStartInfo(executable, arguments)
            {
                UseShellExecute = false,
                CreateNoWindow = true,
                RedirectStandardOutput = true,  // read below: a pipe nobody reads would block the runtime
                RedirectStandardError = true,
            };
            var process = new Process { StartInfo = info, EnableRaisingEvents = true };
            var runtime = new RuntimeProcess(process, endpoint);
            process.OutputDataReceived += (_, e) => runtime.OnLine(e.Data);
            process.ErrorDataReceived += (_, e) => runtime.OnLine(e.Data);
            process.Start();
            process.BeginOutputReadLine();
            process.BeginErrorReadLine();
            return runtime;
        }

        /// <summary>Completes once the runtime answers a ping; fails if it exits first or the time runs out.</summary>
        public async Task WaitReady(TimeSpan timeout)
        {
            var options = new LlmClientOptions { RequestTimeout = timeout, ReconnectMax = TimeSpan.FromMilliseconds(250) };
            var clock = Stopwatch.StartNew();
            using (var client = new LlmClient(Endpoint, options, new InlineContext()))
            {
                Task<double> ping = client.Ping();
                while (!ping.IsCompleted)
                {
                    if (Process.HasExited)
                        throw new InvalidOperationException("gllm serve exited with code " + Process.ExitCode +
                                                            " before it was ready; its last output:\n" + LastOutput());
                    if (clock.Elapsed > timeout)
                        throw new TimeoutException("gllm serve did not answer within " + timeout.TotalSeconds + " s");
                    await Task.WhenAny(ping, Task.Delay(100)).ConfigureAwait(false);
                }
                await ping.ConfigureAwait(false);
            }
        }

        /// <summary>The last lines the runtime printed, for error messages.</summary>
        public string LastOutput()
        {
            lock (lastLines) return string.Join("\n", lastLines.ToArray());
        }

        /// <summary>Kills the runtime if it still runs; does not wait for it to exit.</summary>
        public void Dispose()
        {
            try
            {
                if (!Process.HasExited) Process.Kill();
            }
            catch (InvalidOperationException) { }  // it exited in between
            catch (System.ComponentModel.Win32Exception) { }
        }

        void OnLine(string line)
        {
            if (line == null) return;  // end of the stream
            lock (lastLines)
            {
                lastLines.Enqueue(line);
                while (lastLines.Count > KeptLines) lastLines.Dequeue();
            }
            Action<string> output = Output;
            if (output != null) output(line);
        }

        static string Quote(string arg)
        {
            return "\"" + arg.Replace("\"", "\\\"") + "\"";
        }

        /// <summary>Runs posted callbacks at once, on the posting (network) thread: WaitReady needs no game loop.</summary>
        sealed class InlineContext : SynchronizationContext
        {
            public override void Post(SendOrPostCallback d, object state) { d(state); }
        }
    }
}
